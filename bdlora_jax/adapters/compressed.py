"""The device form of a compressed bank for one strategy and mesh: shared bases V, U per cluster and Σ per adapter.

Per adapted module (model orientation y = x·W, so the delta is y += x · V · Σᵀ · U):
- V is shaped and sharded like the adapter bank's A factor and U like its B factor (U here is the store's Uᵀ),
  with the cluster count in place of the slot axis and the layout rank R in place of max_lora_rank;
- Σ is (adapters + 1, nbΣ, R/nbΣ, R/nbΣ), row 0 all zeros (rows that use no compressed adapter); under
  bdlora nbΣ = N (one block per device block of the module's block-diagonal factor), else nbΣ = 1.
A bank of nb blocks is, per cluster, an adapter of rank nb·r_b whose column modules have V over all inputs and
U in nb output blocks (row modules the reverse), and adapters.layout places it like any adapter, Σ along with it:
under replicated / slora one dense block of rank nb·r_b (padded to a multiple of N for slora's rank sharding);
under bdlora each device block owns nb/N whole compression blocks (N | nb), or, for a dense bank (nb = 1),
the whole rank r_b.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import COLUMN_MODULES, ModelConfig
from ..sharding import ShardingPlan, sigma_axes
from .bank import bank_key
from .compressed_store import CompressedBank, CompressedBankError, CompressedModule, load_compressed_bank
from .layout import AdapterLayout, served_rank

CompressedArrays = dict[str, tuple[jax.Array, jax.Array, jax.Array]]


@dataclass(frozen=True)
class CompressedLayout:
    """Static shapes of a compressed bank on one plan: clusters, adapters, layout rank R and model-axis size N."""

    config: ModelConfig
    clusters: int
    adapters: int
    rank: int
    model_blocks: int
    block_factors: bool
    modules: tuple[tuple[int, str], ...]

    @classmethod
    def for_bank(cls, bank: CompressedBank, config: ModelConfig, plan: ShardingPlan, where: str) -> CompressedLayout:
        """The layout serving `bank` (from directory `where`) on `plan`; a bank that cannot be served raises."""
        n, nb, rb = plan.model_size, bank.blocks, bank.rank_per_block
        if plan.block_factors and nb % n and nb != 1:
            raise CompressedBankError(
                f"compressed bank {where}: blocks={nb} on mesh {'x'.join(map(str, plan.mesh.devices.shape))} "
                f"(model axis {n}) under strategy 'bdlora': each device must own whole blocks, so the model "
                f"axis must divide {nb} (or the bank must be dense, blocks=1); or use 'replicated' or 'slora'")
        rank = served_rank(nb * rb, nb, plan.block_factors, n)
        if not plan.block_factors and plan.strategy != "replicated":
            rank = -(-rank // n) * n
        return cls(config, bank.num_clusters, len(bank.names), rank, n, plan.block_factors, tuple(sorted(bank.modules)))

    def adapter_layout(self) -> AdapterLayout:
        """The adapter layout V / U take (slots = clusters, max_rank = R) and Σ follows."""
        return AdapterLayout(self.config, self.block_factors, self.model_blocks, self.rank)

    def shapes(self, module: str) -> tuple[tuple[tuple[int, ...], tuple], ...]:
        """((V shape, axes), (U shape, axes), (Σ shape, axes)) of one module."""
        layout = self.adapter_layout()
        (v_shape, v_axes), (u_shape, u_axes) = layout.factor_shapes(module, self.clusters)
        sigma = (self.adapters + 1, layout.blocks, layout.block_rank, layout.block_rank)
        return (v_shape, v_axes), (u_shape, u_axes), (sigma, sigma_axes(module, self.block_factors))


def abstract_compressed(layout: CompressedLayout, plan: ShardingPlan, dtype: str = "float32") -> dict:
    """Shapes, dtypes and shardings of the device arrays without allocating them (for compiling)."""
    out = {}
    for layer, module in layout.modules:
        out[bank_key(layer, module)] = tuple(
            jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=plan.sharding(axes))
            for shape, axes in layout.shapes(module))
    return out


def _own_factors(m: CompressedModule, column: bool) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(A, B, a_blocks, b_blocks) of a module's bases as one adapter per cluster, rank nb·r_b (see the docstring)."""
    clusters, nb, _, rb = m.v.shape
    v_blocks, u_blocks = m.v, m.u.transpose(0, 1, 3, 2)
    if column:
        v = v_blocks.transpose(0, 2, 1, 3).reshape(clusters, -1, nb * rb)
        return v, (u_blocks if nb > 1 else u_blocks[:, 0]), 1, nb
    return (v_blocks if nb > 1 else v_blocks[:, 0]), u_blocks.reshape(clusters, nb * rb, -1), nb, 1


def _module_arrays(bank: CompressedBank, key: tuple[int, str], layout: CompressedLayout):
    """Host (V, U, Σ) of one module in the layout (Σ row 0 all zeros)."""
    module, m, placement = key[1], bank.modules[key], layout.adapter_layout()
    v, u = placement.place(module, *_own_factors(m, module in COLUMN_MODULES))
    sigma = placement.place_core(m.sigma_matrices(), bank.blocks)
    sigma = np.concatenate([np.zeros((1,) + sigma.shape[1:], sigma.dtype), sigma])
    return v.astype(np.float32), u.astype(np.float32), sigma.astype(np.float32)


def host_arrays(bank: CompressedBank, layout: CompressedLayout) -> dict[str, tuple[np.ndarray, ...]]:
    """Host (V, U, Σ) of every module the bank adapts, keyed like the adapter bank (others get no compute)."""
    return {bank_key(*key): _module_arrays(bank, key, layout) for key in layout.modules}


class CompressedServing:
    """A compressed bank placed on a plan once: its device arrays and each adapter's (cluster, Σ id)."""

    def __init__(self, bank: CompressedBank, config: ModelConfig, plan: ShardingPlan, where: str, dtype: str):
        self.where = where
        self.layout = CompressedLayout.for_bank(bank, config, plan, where)
        self.names = bank.names
        self.ids = {name: (int(bank.clusters[i]), i + 1) for i, name in enumerate(bank.names)}
        self.arrays: CompressedArrays = {}
        for key, arrays in host_arrays(bank, self.layout).items():
            module = key.partition(".")[2]
            self.arrays[key] = tuple(
                jax.device_put(a.astype(jnp.dtype(dtype)), plan.sharding(axes))
                for a, (_, axes) in zip(arrays, self.layout.shapes(module)))

    @classmethod
    def from_directory(cls, path: str | Path, config: ModelConfig, plan: ShardingPlan, dtype: str) -> CompressedServing:
        """Load a compressed-bank directory (validated against the model) and place it on the plan."""
        return cls(load_compressed_bank(path, config), config, plan, str(path), dtype)

    def __contains__(self, name: object) -> bool:
        return name in self.ids

    def rows(self, names: Iterable[str | None]) -> tuple[list[int], list[int]]:
        """(cluster, Σ id) of each row's adapter name; names outside the bank get (0, 0): no contribution."""
        pairs = [self.ids.get(n, (0, 0)) for n in names]
        return [c for c, _ in pairs], [s for _, s in pairs]
