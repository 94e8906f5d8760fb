"""Adapters → one fitting problem per (layer, module, block): stacked, scaled, normalised factors.

Block j of a module is its output slice j (column modules) or input slice j (row modules), as in
adapters.compressed_store.block_dims: device block j of a bdlora layout of `blocks` model blocks, split as
adapters.layout splits any adapter. For a BD-LoRA adapter only the rank slices whose adapter blocks overlap
block j are kept, so a 16-rank, 8-block BD-LoRA contributes rank 2 per block when compressed with 8 blocks.
Ranks are zero-padded to the largest in the collection (padding changes no D_i).
Each D_ij = s·B·A is normalised to unit Frobenius norm for fitting; its norm is kept to restore it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..adapters.adapter import LoraAdapter, ModuleFactors
from ..adapters.compressed_store import block_dims
from ..adapters.layout import AdapterLayout
from ..config import LORA_MODULES, ModelConfig


@dataclass(frozen=True)
class Problem:
    """One (layer, module, block): a (n, r, d_in_b) and b (n, d_out_b, r) with unit-norm b·a, and the norms."""

    layer: int
    module: str
    block: int
    a: np.ndarray
    b: np.ndarray
    norms: np.ndarray


def block_factors(factors: ModuleFactors, scale: float, module: str, blocks: int,
                  config: ModelConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A_j (r_j, d_in_b), s·B_j (d_out_b, r_j)) of every block j of one adapter's module, PEFT orientation."""
    layout = AdapterLayout(config, True, blocks, factors.rank * blocks)
    parts = layout.split(module, factors.own_a(), scale * factors.own_b(), factors.a_blocks, factors.b_blocks)
    return [(a_j.T, b_j.T) for a_j, b_j in parts]


def target_modules(adapters: Sequence[LoraAdapter]) -> list[tuple[int, str]]:
    """Every (layer, module) that at least one adapter adapts, in model order."""
    keys = {key for adapter in adapters for key in adapter.modules}
    return sorted(keys, key=lambda k: (k[0], LORA_MODULES.index(k[1])))


def build_problems(adapters: Sequence[LoraAdapter], layer: int, module: str, blocks: int,
                   config: ModelConfig) -> list[Problem]:
    """Every block's problem of (layer, module), stacked over the adapters; one without the module gives zeros."""
    d_in_b, d_out_b = block_dims(config, module, blocks)
    empty = [(np.zeros((0, d_in_b), np.float32), np.zeros((d_out_b, 0), np.float32))] * blocks
    per_adapter = [block_factors(adapter.modules[(layer, module)], adapter.scale, module, blocks, config)
                   if (layer, module) in adapter.modules else empty for adapter in adapters]
    return [_problem(layer, module, j, [parts[j] for parts in per_adapter], d_in_b, d_out_b) for j in range(blocks)]


def build_problem(adapters: Sequence[LoraAdapter], layer: int, module: str, blocks: int, j: int,
                  config: ModelConfig) -> Problem:
    """Block j's problem of (layer, module), stacked over the adapters."""
    return build_problems(adapters, layer, module, blocks, config)[j]


def _problem(layer: int, module: str, j: int, parts: list[tuple[np.ndarray, np.ndarray]], d_in_b: int,
             d_out_b: int) -> Problem:
    """Block j's per-adapter (A_j, s·B_j) zero-padded to one rank, each normalised to a unit-norm product."""
    rank = max(1, max(a.shape[0] for a, _ in parts))
    a = np.zeros((len(parts), rank, d_in_b), np.float32)
    b = np.zeros((len(parts), d_out_b, rank), np.float32)
    for i, (ai, bi) in enumerate(parts):
        a[i, :ai.shape[0]] = ai
        b[i, :, :bi.shape[1]] = bi
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.sqrt(np.maximum(np.einsum("nkl,nlk->n", np.einsum("nok,nol->nkl", b64, b64),
                                         np.einsum("nkd,nld->nkl", a64, a64)), 0.0))
    b /= np.where(norms > 0, norms, 1.0)[:, None, None]
    return Problem(layer, module, j, a, b, norms.astype(np.float32))
