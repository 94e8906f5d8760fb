"""One LoRA or BD-LoRA adapter held on the host, in PEFT's tensor layout, with its dense math equivalents."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


def block_diag_from_packed(packed: np.ndarray, nblocks: int) -> np.ndarray:
    """Dense (rows·…) block-diagonal matrix from PEFT's packing: blocks stacked along dim 0."""
    blocks = np.split(packed, nblocks, axis=0)
    rows = packed.shape[0] // nblocks
    cols = packed.shape[1]
    dense = np.zeros((packed.shape[0], cols * nblocks), packed.dtype)
    for i, block in enumerate(blocks):
        dense[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] = block
    return dense


@dataclass(frozen=True)
class ModuleFactors:
    """A module's factors as PEFT stores them: lora_A (r, d_in) and lora_B (d_out, r), or packed blocks.

    A block-diagonal A is stored (r, d_in/nb) with block i = rows [i·r/nb, (i+1)·r/nb) acting on input
    slice i; a block-diagonal B is stored (d_out, r/nb) with block i = rows [i·d_out/nb, …) reading rank
    slice i.
    """

    a: np.ndarray
    b: np.ndarray
    a_blocks: int = 1
    b_blocks: int = 1

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def own_a(self) -> np.ndarray:
        """A in model orientation: (d_in, r), or its blocks (a_blocks, d_in/a_blocks, r/a_blocks)."""
        if self.a_blocks == 1:
            return self.a.T
        return self.a.reshape(self.a_blocks, self.rank // self.a_blocks, -1).transpose(0, 2, 1)

    def own_b(self) -> np.ndarray:
        """B in model orientation, unscaled: (r, d_out), or its blocks (b_blocks, r/b_blocks, d_out/b_blocks)."""
        if self.b_blocks == 1:
            return self.b.T
        return self.b.reshape(self.b_blocks, self.b.shape[0] // self.b_blocks, -1).transpose(0, 2, 1)

    def dense_a(self) -> np.ndarray:
        """A as a dense (d_in, r) matrix for y = x·A·B."""
        if self.a_blocks == 1:
            return self.a.T
        return block_diag_from_packed(self.a, self.a_blocks).T

    def dense_b(self) -> np.ndarray:
        """B as a dense (r, d_out) matrix for y = x·A·B (scale not applied)."""
        if self.b_blocks == 1:
            return self.b.T
        return block_diag_from_packed(self.b, self.b_blocks).T


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter: factors per (layer, module) plus the PEFT config fields that define its math."""

    name: str
    rank: int
    alpha: float
    modules: Mapping[tuple[int, str], ModuleFactors]
    use_rslora: bool = False
    nblocks: int = 1
    bd_a_modules: tuple[str, ...] = ()
    bd_b_modules: tuple[str, ...] = ()
    base_model: str | None = None
    extra_config: Mapping[str, object] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; r is the full rank even for BD-LoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({module for _, module in self.modules}))
