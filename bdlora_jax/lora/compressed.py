"""The device form of a compressed bank for one strategy and mesh: shared bases V, U per cluster and Σ per adapter.

Per adapted module (model orientation y = x·W, so the delta is y += x · V · Σᵀ · U):
- V is shaped and sharded like the adapter bank's A factor and U like its B factor (U here is the store's Uᵀ),
  with the cluster count in place of the slot axis and the layout rank R in place of max_lora_rank;
- Σ is (adapters + 1, nbΣ, R/nbΣ, R/nbΣ), row 0 all zeros (rows that use no compressed adapter); under
  bdlora nbΣ = N (one block per device block of the module's block-diagonal factor), else nbΣ = 1.
A bank of nb blocks becomes the strategy's layout as lora.bank's `_block_slot` does for an adapter: under
replicated / slora one dense block of rank nb·r_b (padded to a multiple of N for slora's rank sharding);
under bdlora each device block owns nb/N whole compression blocks (N | nb), or, for a dense bank (nb = 1),
the whole V (column) or its input slice of V (row), the whole Σ and its output slice of U (column) or the
whole U (row), i.e. rank r_b per device block.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .compressed_store import CompressedBank, CompressedBankError, load_compressed_bank
from ..config import COLUMN_MODULES, ModelConfig
from ..sharding import ShardingPlan
from .bank import BankLayout, bank_key, factor_axes

CompressedArrays = dict[str, tuple[jax.Array, jax.Array, jax.Array]]


def sigma_axes(module: str, block_factors: bool) -> tuple:
    """Logical axes of a module's Σ: blocked like the module's block-diagonal factor under bdlora."""
    if not block_factors:
        return ("adapter", None, None, None)
    kv = module in ("k_proj", "v_proj")
    return ("adapter", "kv_lora_block" if kv else "lora_block", None, None)


def compressed_axes(module: str, block_factors: bool) -> tuple[tuple, tuple, tuple]:
    """Logical axes of a module's (V, U, Σ): V like the bank's A, U like its B."""
    a_axes, b_axes = factor_axes(module, block_factors)
    return a_axes, b_axes, sigma_axes(module, block_factors)


@dataclass(frozen=True)
class CompressedLayout:
    """Static shapes of a compressed bank on one plan: clusters, adapters, layout rank R and blocks N."""

    config: ModelConfig
    clusters: int
    adapters: int
    rank: int
    nblocks: int
    block_factors: bool
    modules: tuple[tuple[int, str], ...]

    @classmethod
    def for_bank(cls, bank: CompressedBank, config: ModelConfig, plan: ShardingPlan, where: str) -> CompressedLayout:
        """The layout serving `bank` (from directory `where`) on `plan`; a bank that cannot be served raises."""
        n, nb, rb = plan.model_size, bank.blocks, bank.rank_per_block
        if plan.block_factors:
            if nb % n and nb != 1:
                raise CompressedBankError(
                    f"compressed bank {where}: blocks={nb} on mesh {'x'.join(map(str, plan.mesh.devices.shape))} "
                    f"(model axis {n}) under strategy 'bdlora': each device must own whole blocks, so the model "
                    f"axis must divide {nb} (or the bank must be dense, blocks=1); or use 'replicated' or 'slora'")
            rank = nb * rb if nb % n == 0 else n * rb
        else:
            rank = nb * rb
            if plan.strategy != "replicated":
                rank = -(-rank // n) * n
        return cls(config, bank.num_clusters, len(bank.names), rank, n, plan.block_factors, tuple(sorted(bank.modules)))

    def bank_layout(self) -> BankLayout:
        """The adapter-bank layout whose A / B shapes V / U take (slots = clusters, max_rank = R)."""
        return BankLayout(self.config, self.clusters, self.rank, self.nblocks, self.block_factors)

    def shapes(self, module: str) -> tuple[tuple[tuple[int, ...], tuple], ...]:
        """((V shape, axes), (U shape, axes), (Σ shape, axes)) of one module."""
        (v_shape, v_axes), (u_shape, u_axes) = self.bank_layout().factor_shapes(module)
        nbs = self.nblocks if self.block_factors else 1
        sigma = (self.adapters + 1, nbs, self.rank // nbs, self.rank // nbs)
        return (v_shape, v_axes), (u_shape, u_axes), (sigma, sigma_axes(module, self.block_factors))


def abstract_compressed(layout: CompressedLayout, plan: ShardingPlan, dtype: str = "float32") -> dict:
    """Shapes, dtypes and shardings of the device arrays without allocating them (for compiling)."""
    out = {}
    for layer, module in layout.modules:
        out[bank_key(layer, module)] = tuple(
            jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=plan.sharding(axes))
            for shape, axes in layout.shapes(module))
    return out


def _module_arrays(bank: CompressedBank, key: tuple[int, str], layout: CompressedLayout):
    """Host (V, U, Σ) of one module in the layout."""
    module = key[1]
    (v_shape, _), (u_shape, _), (s_shape, _) = layout.shapes(module)
    v, u, sigma = (np.zeros(s, np.float32) for s in (v_shape, u_shape, s_shape))
    m = bank.modules[key]
    nb, rb, n, column = bank.blocks, bank.rank_per_block, layout.nblocks, module in COLUMN_MODULES
    mu, mv, ms = m.u, m.v, m.sigma_matrices()
    d_in, d_out = layout.config.module_dims(module)
    if layout.block_factors and nb == 1 and n > 1:  # a dense bank: every device block serves the whole rank
        for i in range(n):
            if column:
                v[:, :, i * rb:(i + 1) * rb] = mv[:, 0]
                u[:, i] = mu[:, 0, i * d_out // n:(i + 1) * d_out // n].transpose(0, 2, 1)
            else:
                v[:, i] = mv[:, 0, i * d_in // n:(i + 1) * d_in // n]
                u[:, i * rb:(i + 1) * rb] = mu[:, 0].transpose(0, 2, 1)
            sigma[1:, i] = ms[:, 0]
        return v, u, sigma
    k = nb // n if layout.block_factors else nb  # compression blocks per device block
    d_in_b, d_out_b = (d_in, d_out // nb) if column else (d_in // nb, d_out)
    for j in range(nb):
        dev, m_ = divmod(j, k)  # device block and position inside it
        rank = slice(j * rb, (j + 1) * rb)
        local = slice(m_ * rb, (m_ + 1) * rb)
        ut = mu[:, j].transpose(0, 2, 1)
        if column:
            v[:, :, rank] = mv[:, j]
            if layout.block_factors:
                u[:, dev, local, m_ * d_out_b:(m_ + 1) * d_out_b] = ut
            else:
                u[:, rank, j * d_out_b:(j + 1) * d_out_b] = ut
        else:
            if layout.block_factors:
                v[:, dev, m_ * d_in_b:(m_ + 1) * d_in_b, local] = mv[:, j]
            else:
                v[:, j * d_in_b:(j + 1) * d_in_b, rank] = mv[:, j]
            u[:, rank] = ut
        block, within = (dev, local) if layout.block_factors else (0, rank)
        sigma[1:, block, within, within] = ms[:, j]
    return v, u, sigma


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
