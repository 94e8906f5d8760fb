"""The device adapter bank: every adapted module's factors stacked over slots, and writing one slot in place.

Slot 0 is all zeros; the factor shapes and how an adapter fills a slot (block slicing, rank padding, dense
factors under bdlora) are adapters.layout's. The scale is folded into B when a slot is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..config import LORA_MODULES, ModelConfig
from ..sharding import ShardingPlan
from .adapter import LoraAdapter
from .layout import AdapterLayout, FactorShapes
from .peft_io import AdapterError


def bank_key(layer: int, module: str) -> str:
    return f"{layer}.{module}"


@dataclass(frozen=True)
class BankLayout:
    """Static shapes and logical axes of every factor in the bank: the adapter layout over num_slots slots."""

    config: ModelConfig
    num_slots: int
    max_rank: int
    model_blocks: int
    block_factors: bool
    dtype: str = "float32"

    @classmethod
    def for_plan(cls, config: ModelConfig, plan: ShardingPlan, max_loras: int, max_rank: int, dtype: str) -> BankLayout:
        return cls(config, max_loras + 1, max_rank, plan.model_size, plan.block_factors, dtype)

    @property
    def adapter_layout(self) -> AdapterLayout:
        """How one adapter fills a slot."""
        return AdapterLayout(self.config, self.block_factors, self.model_blocks, self.max_rank)

    def factor_shapes(self, module: str) -> FactorShapes:
        """((A shape, A logical axes), (B shape, B logical axes)) of one module, slot dim first."""
        return self.adapter_layout.factor_shapes(module, self.num_slots)

    def module_keys(self) -> list[tuple[int, str]]:
        return [(layer, module) for layer in range(self.config.num_layers) for module in LORA_MODULES]


def bank_specs(layout: BankLayout, plan: ShardingPlan) -> dict[str, tuple]:
    """PartitionSpecs of every factor, keyed like the bank."""
    out = {}
    for layer, module in layout.module_keys():
        (_, a_axes), (_, b_axes) = layout.factor_shapes(module)
        out[bank_key(layer, module)] = (plan.spec(a_axes), plan.spec(b_axes))
    return out


def abstract_bank(layout: BankLayout, plan: ShardingPlan) -> dict[str, tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]:
    """Shapes, dtypes and shardings of the bank without allocating it (for compiling from abstract shapes)."""
    out = {}
    for layer, module in layout.module_keys():
        (a_shape, a_axes), (b_shape, b_axes) = layout.factor_shapes(module)
        out[bank_key(layer, module)] = (
            jax.ShapeDtypeStruct(a_shape, jnp.dtype(layout.dtype), sharding=plan.sharding(a_axes)),
            jax.ShapeDtypeStruct(b_shape, jnp.dtype(layout.dtype), sharding=plan.sharding(b_axes)),
        )
    return out


def zeros_bank(layout: BankLayout, plan: ShardingPlan) -> dict[str, tuple[jax.Array, jax.Array]]:
    """An all-zero bank placed straight into its shardings."""
    abstract = abstract_bank(layout, plan)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract), out_shardings=shardings)()


def slot_arrays(adapter: LoraAdapter, layout: BankLayout) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Host arrays of one bank slot for an adapter (zeros for modules it does not adapt); validates the fit."""
    if adapter.rank > layout.max_rank:
        raise AdapterError(f"adapter {adapter.name!r}: rank {adapter.rank} exceeds max_lora_rank={layout.max_rank}")
    placement = layout.adapter_layout
    out = {}
    for layer, module in layout.module_keys():
        factors = adapter.modules.get((layer, module))
        if factors is None:
            (a_shape, _), (b_shape, _) = layout.factor_shapes(module)
            out[bank_key(layer, module)] = (np.zeros(a_shape[1:], np.float32), np.zeros(b_shape[1:], np.float32))
            continue
        placement.check_fit(module, factors.rank, factors.a_blocks, factors.b_blocks, repr(adapter.name))
        a, b = placement.place(module, factors.own_a(), adapter.scale * factors.own_b(), factors.a_blocks,
                               factors.b_blocks)
        out[bank_key(layer, module)] = (a.astype(np.float32), b.astype(np.float32))
    return out


@partial(jax.jit, donate_argnums=0)
def _write_slot(bank, slot, arrays):
    return jax.tree.map(lambda full, new: full.at[slot].set(new.astype(full.dtype)), bank, arrays)


def write_slot(bank: dict, slot: int, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Write one slot of the bank in place (the old bank buffers are donated); compiles once per bank shape."""
    if not 0 < slot < next(iter(bank.values()))[0].shape[0]:
        raise IndexError(f"slot {slot} is outside 1..{next(iter(bank.values()))[0].shape[0] - 1}")
    return _write_slot(bank, jnp.int32(slot), arrays)
