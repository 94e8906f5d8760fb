"""Random LoRA / BD-LoRA adapters (PEFT tensor layout) for tests, the demo and benchmarks."""

import numpy as np

from ..config import COLUMN_MODULES, LORA_MODULES, ModelConfig
from .adapter import LoraAdapter, ModuleFactors


def random_adapter(config: ModelConfig, name: str, rank: int, nblocks: int = 1, seed: int = 0,
                   modules=LORA_MODULES, alpha: float | None = None) -> LoraAdapter:
    """An adapter with nonzero A and B on every layer; nblocks > 1 makes it BD-LoRA (column B, row A blocks)."""
    rng = np.random.default_rng(seed)
    factors = {}
    for layer in range(config.num_layers):
        for module in modules:
            d_in, d_out = config.module_dims(module)
            a_blocks = nblocks if module not in COLUMN_MODULES else 1
            b_blocks = nblocks if module in COLUMN_MODULES else 1
            a = rng.normal(0, 0.2, (rank, d_in // a_blocks)).astype(np.float32)
            b = rng.normal(0, 0.2, (d_out, rank // b_blocks)).astype(np.float32)
            factors[(layer, module)] = ModuleFactors(a, b, a_blocks, b_blocks)
    bd = nblocks > 1
    return LoraAdapter(
        name=name, rank=rank, alpha=float(alpha if alpha is not None else 2 * rank), modules=factors, nblocks=nblocks,
        bd_a_modules=("o_proj", "down_proj") if bd else (),
        bd_b_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") if bd else (),
    )
