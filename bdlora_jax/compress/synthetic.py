"""Random compressed banks (for tests and benchmarks): orthonormal bases per cluster and block, random Σ."""

from __future__ import annotations

import numpy as np

from ..config import LORA_MODULES, ModelConfig
from .store import CompressedBank, CompressedModule, block_dims


def random_compressed_bank(config: ModelConfig, num_adapters: int, rank: int, clusters: int = 1, blocks: int = 1,
                           method: str = "full", seed: int = 0, modules=LORA_MODULES,
                           prefix: str = "compressed") -> CompressedBank:
    """A bank of `num_adapters` adapters named <prefix>-<i>, assigned to clusters round-robin."""
    rng = np.random.default_rng(seed)
    rb = rank // blocks
    out = {}
    for layer in range(config.num_layers):
        for module in modules:
            d_in_b, d_out_b = block_dims(config, module, blocks)
            u = np.linalg.qr(rng.normal(size=(clusters, blocks, d_out_b, rb)))[0].astype(np.float32)
            v = np.linalg.qr(rng.normal(size=(clusters, blocks, d_in_b, rb)))[0].astype(np.float32)
            shape = (num_adapters, blocks, rb, rb) if method == "full" else (num_adapters, blocks, rb)
            sigma = rng.normal(0, 0.5, shape).astype(np.float32)
            out[(layer, module)] = CompressedModule(u, v, sigma, np.zeros(num_adapters))
    names = tuple(f"{prefix}-{i}" for i in range(num_adapters))
    return CompressedBank(names, np.arange(num_adapters, dtype=np.int32) % clusters, method, rank, blocks, out)
