"""How an adapter's own factors sit in a strategy's bank: factor shapes, logical axes and the one placement rule.

An adapter module's own factors, in model orientation y = x·A·B: A (d_in, r) and B (r, d_out), or, for a factor
with nb > 1 blocks, its blocks A (nb, d_in/nb, r/nb) (block i reads input slice i into rank slice i) or
B (nb, r/nb, d_out/nb) (block i writes output slice i from rank slice i); leading axes (adapters, clusters) ride
along. BD-LoRA makes column modules' B and row modules' A block-diagonal; that factor's block count is the one
that decides the placement (`own_blocks`).

The bank splits a module into `blocks` device blocks (the model-axis size N under bdlora, else one): device block
j covers output slice j (column modules) or input slice j (row modules) and serves the adapter's ranks of the
blocks overlapping it, padded to R/blocks, in the first entries of block j. So under bdlora an adapter of N·k
blocks gives each device k whole blocks, and a dense factor of rank r gives every device block its whole rank
(served exactly as a block-diagonal adapter of rank r·N). Bank shapes (S slots, R = max_lora_rank):
- dense (replicated, slora): A (S, d_in, R), B (S, R, d_out);
- bdlora: column modules A (S, d_in, R) split on rank and B (S, N, R/N, d_out/N) block-diagonal;
  row modules A (S, N, d_in/N, R/N) block-diagonal and B (S, R, d_out) split on rank.
`place` works on numpy arrays (host) and jax arrays alike, differentiably for training; `split` gives its device
blocks unpadded (compression fits each block on its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..config import COLUMN_MODULES, ModelConfig
from ..sharding import factor_axes
from .peft_io import AdapterError

FactorShapes = tuple[tuple[tuple[int, ...], tuple], tuple[tuple[int, ...], tuple]]


def own_blocks(module: str, a_blocks: int, b_blocks: int) -> int:
    """The block count that decides placement: that of B for column modules, of A for row modules."""
    return b_blocks if module in COLUMN_MODULES else a_blocks


def rank_slices(rank: int, nblocks: int, blocks: int) -> list[slice]:
    """The ranks device block j of `blocks` serves: those of the adapter's `nblocks` blocks overlapping it."""
    step = rank // nblocks
    return [slice(j * nblocks // blocks * step, -(-(j + 1) * nblocks // blocks) * step) for j in range(blocks)]


def served_rank(rank: int, nblocks: int, block_factors: bool, model_blocks: int) -> int:
    """max_lora_rank an adapter of `rank` with `nblocks` own blocks needs: r, or r·N for a dense one under bdlora."""
    if not block_factors:
        return rank
    return model_blocks * max(s.stop - s.start for s in rank_slices(rank, nblocks, model_blocks))


def block_diagonal(blocks):
    """(..., nb, p, q) blocks -> the (..., nb·p, nb·q) block-diagonal matrix (numpy or jax, as given)."""
    xp = _namespace(blocks)
    *lead, nb, p, q = blocks.shape
    eye = xp.eye(nb, dtype=blocks.dtype)
    return (blocks[..., :, :, None, :] * eye[:, None, :, None]).reshape(*lead, nb * p, nb * q)


def _namespace(*arrays):
    """jax.numpy for jax arrays and tracers (keeps placement differentiable), numpy for host arrays."""
    return jnp if any(isinstance(x, jax.Array) for x in arrays) else np


def _pad(x, axis: int, size: int):
    """x zero-padded at the end of `axis` to `size` entries."""
    width = [(0, 0)] * x.ndim
    width[axis] = (0, size - x.shape[axis])
    return _namespace(x).pad(x, width)


@dataclass(frozen=True)
class AdapterLayout:
    """One strategy's adapter layout: dense or block-diagonal factors, model-axis blocks N, max_lora_rank R."""

    config: ModelConfig
    block_factors: bool
    model_blocks: int
    max_rank: int

    @property
    def blocks(self) -> int:
        """Device blocks a module's factors are split into: N under bdlora, else one."""
        return self.model_blocks if self.block_factors else 1

    @property
    def block_rank(self) -> int:
        """Rank entries of one device block."""
        return self.max_rank // self.blocks

    def factor_shapes(self, module: str, slots: int) -> FactorShapes:
        """((A shape, A logical axes), (B shape, B logical axes)) of one module, `slots` first."""
        s, r, n = slots, self.max_rank, self.model_blocks
        d_in, d_out = self.config.module_dims(module)
        a_axes, b_axes = factor_axes(module, self.block_factors)
        if module in COLUMN_MODULES:
            a_shape = (s, d_in, r)
            b_shape = (s, n, r // n, d_out // n) if self.block_factors else (s, r, d_out)
        else:
            a_shape = (s, n, d_in // n, r // n) if self.block_factors else (s, d_in, r)
            b_shape = (s, r, d_out)
        return (a_shape, a_axes), (b_shape, b_axes)

    def check_fit(self, module: str, rank: int, a_blocks: int, b_blocks: int, where: str) -> None:
        """Raise AdapterError when adapter `where`'s module cannot be served exactly under bdlora on this layout."""
        if not self.block_factors:
            return
        n, blocks = self.model_blocks, own_blocks(module, a_blocks, b_blocks)
        if blocks > 1 and blocks % n:
            raise AdapterError(
                f"adapter {where}: nblocks={blocks} is not a multiple of the model-axis size {n}; under strategy "
                f"'bdlora' each device must own whole blocks (use a mesh whose model axis divides {blocks}, "
                "or strategy 'replicated' or 'slora')"
            )
        if blocks == 1 and rank > self.block_rank:
            raise AdapterError(
                f"adapter {where}: {module} has a dense factor of rank {rank}; under strategy 'bdlora' on a model "
                f"axis of {n} it is served exactly as a block-diagonal adapter of rank {rank * n}, which needs "
                f"max_lora_rank >= {rank * n} (have {self.max_rank}); or use strategy 'replicated' or 'slora'"
            )

    def split(self, module: str, a, b, a_blocks: int = 1, b_blocks: int = 1) -> list[tuple]:
        """Each device block j's (A_j (…, d_in_j, r_j), B_j (…, r_j, d_out_j)) of an adapter module's own factors."""
        a = a if a_blocks == 1 else block_diagonal(a)
        b = b if b_blocks == 1 else block_diagonal(b)
        column, m = module in COLUMN_MODULES, self.blocks
        d_in, d_out = a.shape[-2], b.shape[-1]
        slices = rank_slices(a.shape[-1], own_blocks(module, a_blocks, b_blocks), m)
        if column:
            return [(a[..., :, s], b[..., s, j * d_out // m:(j + 1) * d_out // m]) for j, s in enumerate(slices)]
        return [(a[..., j * d_in // m:(j + 1) * d_in // m, s], b[..., s, :]) for j, s in enumerate(slices)]

    def place(self, module: str, a, b, a_blocks: int = 1, b_blocks: int = 1):
        """An adapter module's own factors (scale already in B) as this layout's (A, B), leading axes kept."""
        xp, rb = _namespace(a, b), self.block_rank
        parts = self.split(module, a, b, a_blocks, b_blocks)
        needed = max(b_j.shape[-2] for _, b_j in parts)
        if needed > rb:
            raise ValueError(f"{module}: device blocks need rank {needed}, the layout has {rb} per block")
        a_parts = [_pad(a_j, -1, rb) for a_j, _ in parts]
        b_parts = [_pad(b_j, -2, rb) for _, b_j in parts]
        if module in COLUMN_MODULES:
            return xp.concatenate(a_parts, axis=-1), self._blocked(b_parts, xp)
        return self._blocked(a_parts, xp), xp.concatenate(b_parts, axis=-2)

    def place_core(self, core, nblocks: int):
        """Per-adapter cores (..., nb, r_b, r_b) between A and B as (..., blocks, R/blocks, R/blocks), like `place`."""
        xp = _namespace(core)
        dense = block_diagonal(core)
        return xp.stack([_pad(_pad(dense[..., s, s], -1, self.block_rank), -2, self.block_rank)
                         for s in rank_slices(dense.shape[-1], nblocks, self.blocks)], axis=-3)

    def _blocked(self, parts: list, xp):
        """The block-diagonal factor: device blocks stacked under bdlora, else the one dense block."""
        return xp.stack(parts, axis=-3) if self.block_factors else parts[0]
