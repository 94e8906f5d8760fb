"""Trainable adapter factors in their own structure (dense LoRA, or BD-LoRA with nblocks), and the bank they serve as.

K adapters train together, stacked on a leading axis. Per module: A (K, d_in, r) or block-diagonal
(K, nb, d_in/nb, r/nb); B (K, r, d_out) or block-diagonal (K, nb, r/nb, d_out/nb). `to_bank` places them,
differentiably, as adapters.layout places every adapter, into the strategy's bank layout (slot 0 = zeros, slot k+1 =
adapter k, scale folded into B), so training runs the very forward pass that serving runs; `export` writes them
as PEFT adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..adapters.adapter import LoraAdapter, ModuleFactors
from ..adapters.bank import BankLayout, bank_key
from ..adapters.layout import served_rank
from ..config import COLUMN_MODULES, ModelConfig
from ..distributed import to_host


@dataclass(frozen=True)
class AdapterSpec:
    """The structure shared by the adapters trained together."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    nblocks: int = 1
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def blocks(self, module: str) -> tuple[int, int]:
        """(a_blocks, b_blocks): BD-LoRA makes column modules' B and row modules' A block-diagonal."""
        if self.nblocks == 1:
            return 1, 1
        return (1, self.nblocks) if module in COLUMN_MODULES else (self.nblocks, 1)

    def validate(self, config: ModelConfig) -> None:
        if self.rank % self.nblocks:
            raise ValueError(f"rank={self.rank} must be divisible by nblocks={self.nblocks}")
        for module in self.target_modules:
            d_in, d_out = config.module_dims(module)
            a_blocks, b_blocks = self.blocks(module)
            if d_in % a_blocks or d_out % b_blocks:
                raise ValueError(f"nblocks={self.nblocks} does not divide {module}'s dimensions {(d_in, d_out)}")


def init_factors(spec: AdapterSpec, config: ModelConfig, count: int, seed: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """PEFT's initialisation: A kaiming-uniform (a=sqrt(5); a=0 on the block fan-in for block-diagonal A), B zeros.

    Adapter k's values depend only on (seed, k), so an adapter starts the same whether it trains alone or with others.
    """
    factors = {}
    for layer in range(config.num_layers):
        for m, module in enumerate(spec.target_modules):
            d_in, d_out = config.module_dims(module)
            a_blocks, b_blocks = spec.blocks(module)
            r = spec.rank
            if a_blocks == 1:
                shape, bound = (d_in, r), 1.0 / math.sqrt(d_in)
            else:
                shape, bound = (a_blocks, d_in // a_blocks, r // a_blocks), math.sqrt(6.0 / (d_in // a_blocks))
            keys = [jax.random.fold_in(jax.random.key(seed), (k * config.num_layers + layer) * 16 + m)
                    for k in range(count)]
            a = jnp.stack([jax.random.uniform(key, shape, jnp.float32, -bound, bound) for key in keys])
            b = (jnp.zeros((count, r, d_out), jnp.float32) if b_blocks == 1
                 else jnp.zeros((count, b_blocks, r // b_blocks, d_out // b_blocks), jnp.float32))
            factors[bank_key(layer, module)] = (a, b)
    return factors


def bank_rank(spec: AdapterSpec, model_blocks: int, block_factors: bool) -> int:
    """max_lora_rank the bank needs: r, or r·N for a dense adapter served block-diagonally on N devices."""
    return served_rank(spec.rank, spec.nblocks, block_factors, model_blocks)


def to_bank(factors: dict, spec: AdapterSpec, layout: BankLayout) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The bank (slot 0 zeros, then the K adapters) these factors serve as under the layout's strategy."""
    placement, dtype = layout.adapter_layout, jnp.dtype(layout.dtype)
    bank = {}
    for layer, module in layout.module_keys():
        key = bank_key(layer, module)
        (a_shape, _), (b_shape, _) = layout.factor_shapes(module)
        if key not in factors:
            bank[key] = (jnp.zeros(a_shape, dtype), jnp.zeros(b_shape, dtype))
            continue
        a, b = factors[key]
        a_bank, b_bank = placement.place(module, a, spec.scale * b, *spec.blocks(module))
        bank[key] = (jnp.concatenate([jnp.zeros((1,) + a_bank.shape[1:], dtype), a_bank.astype(dtype)]),
                     jnp.concatenate([jnp.zeros((1,) + b_bank.shape[1:], dtype), b_bank.astype(dtype)]))
    return bank


def _packed(blocks: np.ndarray) -> np.ndarray:
    """(nb, p, q) blocks of our (in, out)-oriented factor -> PEFT's packing (nb·q, p): block i transposed, stacked."""
    return np.concatenate([block.T for block in blocks], axis=0)


def export(factors: dict, spec: AdapterSpec, config: ModelConfig, names: list[str], base_model: str | None = None
           ) -> list[LoraAdapter]:
    """One LoraAdapter (PEFT layout) per trained adapter, ready for write_adapter."""
    host = jax.tree.map(lambda x: to_host(x).astype(np.float32), factors)
    adapters = []
    for index, name in enumerate(names):
        modules = {}
        for layer in range(config.num_layers):
            for module in spec.target_modules:
                a, b = host[bank_key(layer, module)]
                a_blocks, b_blocks = spec.blocks(module)
                peft_a = a[index].T if a_blocks == 1 else _packed(a[index])
                peft_b = b[index].T if b_blocks == 1 else _packed(b[index])
                modules[(layer, module)] = ModuleFactors(peft_a, peft_b, a_blocks, b_blocks)
        bd = spec.nblocks > 1
        adapters.append(LoraAdapter(
            name=name, rank=spec.rank, alpha=spec.alpha, modules=modules, use_rslora=spec.use_rslora,
            nblocks=spec.nblocks,
            bd_a_modules=tuple(m for m in ("o_proj", "down_proj") if m in spec.target_modules) if bd else (),
            bd_b_modules=tuple(m for m in COLUMN_MODULES if m in spec.target_modules) if bd else (),
            base_model=base_model,
        ))
    return adapters
