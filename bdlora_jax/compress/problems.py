"""Adapters → one fitting problem per (layer, module, block): stacked, scaled, normalised factors.

Block j of a module is its output slice j (column modules) or input slice j (row modules), as in
store.block_dims. Any adapter can be split into blocks; for a BD-LoRA adapter only the rank slices whose
adapter blocks overlap block j are kept, so a 16-rank, 8-block BD-LoRA contributes rank 2 per block when
compressed with 8 blocks. Ranks are zero-padded to the largest in the collection (padding changes no D_i).
Each D_ij = s·B·A is normalised to unit Frobenius norm for fitting; its norm is kept to restore it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import COLUMN_MODULES, LORA_MODULES, ModelConfig
from ..lora.adapter import LoraAdapter, ModuleFactors


@dataclass(frozen=True)
class Problem:
    """One (layer, module, block): a (n, r, d_in_b) and b (n, d_out_b, r) with unit-norm b·a, and the norms."""

    layer: int
    module: str
    block: int
    a: np.ndarray
    b: np.ndarray
    norms: np.ndarray


def _overlapping_ranks(rank: int, adapter_blocks: int, blocks: int, j: int) -> np.ndarray:
    """Rank indices of an adapter with `adapter_blocks` blocks whose blocks overlap compression block j."""
    if adapter_blocks == 1:
        return np.arange(rank)
    step = rank // adapter_blocks
    keep = [q for q in range(adapter_blocks) if q * blocks < (j + 1) * adapter_blocks and (q + 1) * blocks > j * adapter_blocks]
    return np.concatenate([np.arange(q * step, (q + 1) * step) for q in keep])


def block_factors(factors: ModuleFactors, scale: float, module: str, blocks: int, j: int,
                  config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(A_j (r_j, d_in_b), s·B_j (d_out_b, r_j)) of block j of one adapter's module, PEFT orientation."""
    a, b = factors.dense_a().T, scale * factors.dense_b().T
    d_in, d_out = config.module_dims(module)
    if module in COLUMN_MODULES:
        ranks = _overlapping_ranks(factors.rank, factors.b_blocks, blocks, j)
        rows = slice(j * d_out // blocks, (j + 1) * d_out // blocks)
        return a[ranks], b[rows][:, ranks]
    ranks = _overlapping_ranks(factors.rank, factors.a_blocks, blocks, j)
    cols = slice(j * d_in // blocks, (j + 1) * d_in // blocks)
    return a[ranks][:, cols], b[:, ranks]


def target_modules(adapters: Sequence[LoraAdapter]) -> list[tuple[int, str]]:
    """Every (layer, module) that at least one adapter adapts, in model order."""
    keys = {key for adapter in adapters for key in adapter.modules}
    return sorted(keys, key=lambda k: (k[0], LORA_MODULES.index(k[1])))


def build_problem(adapters: Sequence[LoraAdapter], layer: int, module: str, blocks: int, j: int,
                  config: ModelConfig) -> Problem:
    """Stack block j of (layer, module) over the adapters; an adapter without the module contributes zeros."""
    from ..lora.compressed_store import block_dims

    d_in_b, d_out_b = block_dims(config, module, blocks)
    parts = []
    for adapter in adapters:
        factors = adapter.modules.get((layer, module))
        if factors is None:
            parts.append((np.zeros((0, d_in_b), np.float32), np.zeros((d_out_b, 0), np.float32)))
        else:
            parts.append(block_factors(factors, adapter.scale, module, blocks, j, config))
    rank = max(1, max(a.shape[0] for a, _ in parts))
    a = np.zeros((len(adapters), rank, d_in_b), np.float32)
    b = np.zeros((len(adapters), d_out_b, rank), np.float32)
    for i, (ai, bi) in enumerate(parts):
        a[i, :ai.shape[0]] = ai
        b[i, :, :bi.shape[1]] = bi
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.sqrt(np.maximum(np.einsum("nkl,nlk->n", np.einsum("nok,nol->nkl", b64, b64),
                                         np.einsum("nkd,nld->nkl", a64, a64)), 0.0))
    b /= np.where(norms > 0, norms, 1.0)[:, None, None]
    return Problem(layer, module, j, a, b, norms.astype(np.float32))
