"""Synthetic data for tests and benchmarks: random compressed banks, and adapter collections with planted structure."""

from __future__ import annotations

import numpy as np

from ..adapters.adapter import LoraAdapter, ModuleFactors
from ..adapters.compressed_store import CompressedBank, CompressedModule, block_dims
from ..config import LORA_MODULES, ModelConfig


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


def clustered_adapters(config: ModelConfig, num_adapters: int, rank: int, families: int, noise: float = 0.1,
                       seed: int = 0, modules=LORA_MODULES) -> list[LoraAdapter]:
    """Rank-`rank` LoRAs from `families` task families: each family shares a rank-`rank` input and output
    subspace per module, each adapter mixes them with its own matrices, plus independent factors carrying a
    fraction noise² of each factor's energy.

    A stand-in for a real collection (fine-tunes of related tasks share subspaces), with planted structure so
    that compression error against rank and clusters has something to find.
    """
    rng = np.random.default_rng(seed)
    spaces = {}
    for f in range(families):
        for layer in range(config.num_layers):
            for module in modules:
                d_in, d_out = config.module_dims(module)
                spaces[f, layer, module] = (np.linalg.qr(rng.normal(size=(d_out, rank)))[0],
                                            np.linalg.qr(rng.normal(size=(d_in, rank)))[0])
    adapters = []
    for i in range(num_adapters):
        family = i % families
        factors = {}
        for layer in range(config.num_layers):
            for module in modules:
                u, v = spaces[family, layer, module]
                d_in, d_out = config.module_dims(module)
                a = rng.normal(size=(rank, rank)) @ v.T + noise * rng.normal(size=(rank, d_in)) * np.sqrt(rank / d_in)
                b = u @ rng.normal(size=(rank, rank)) + noise * rng.normal(size=(d_out, rank)) * np.sqrt(rank / d_out)
                factors[(layer, module)] = ModuleFactors((0.2 * a).astype(np.float32), (0.2 * b).astype(np.float32))
        adapters.append(LoraAdapter(f"task-{i}", rank, float(rank), factors))
    return adapters
