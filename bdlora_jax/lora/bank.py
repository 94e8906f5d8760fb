"""The device adapter bank: every adapted module's factors stacked over slots, and writing one slot in place.

Shapes (S = max_loras + 1 slots, slot 0 all zeros; R = max_lora_rank; N = model-axis size):
- dense (replicated, slora): A (S, d_in, R), B (S, R, d_out);
- bdlora: column modules A (S, d_in, R) split on rank and B (S, N, R/N, d_out/N) block-diagonal;
  row modules A (S, N, d_in/N, R/N) block-diagonal and B (S, R, d_out) split on rank.
Device block i of a bdlora factor owns rank slice [i·R/N, (i+1)·R/N); an adapter of rank r < R fills the
first r/N entries of each block (padded per block). The scale is folded into B when a slot is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..config import COLUMN_MODULES, LORA_MODULES, ModelConfig
from ..sharding import ShardingPlan
from .adapter import LoraAdapter, ModuleFactors
from .peft_io import AdapterError

COLUMN_OUT = {"q_proj": "q_heads", "k_proj": "kv_heads", "v_proj": "kv_heads", "gate_proj": "mlp", "up_proj": "mlp"}
ROW_IN = {"o_proj": "q_heads", "down_proj": "mlp"}


def weight_axes(module: str) -> tuple[str, str]:
    """Logical axes of a base weight in (d_in, d_out) orientation."""
    if module in COLUMN_OUT:
        return ("embed", COLUMN_OUT[module])
    return (ROW_IN[module], "embed")


def factor_axes(module: str, block_factors: bool) -> tuple[tuple, tuple]:
    """Logical axes of a module's (A, B) bank factors; block_factors selects bdlora's block-diagonal form."""
    if module in COLUMN_OUT:
        out = COLUMN_OUT[module]
        kv = out == "kv_heads"
        a = ("adapter", "embed", "kv_lora_rank" if kv else "col_lora_rank")
        b = ("adapter", "kv_lora_block" if kv else "lora_block", None, None) if block_factors else ("adapter", None, out)
        return a, b
    a = ("adapter", "lora_block", None, None) if block_factors else ("adapter", ROW_IN[module], None)
    return a, ("adapter", "row_lora_rank", "row_lora_out")


def bank_key(layer: int, module: str) -> str:
    return f"{layer}.{module}"


@dataclass(frozen=True)
class BankLayout:
    """Static shapes and logical axes of every factor in the bank."""

    config: ModelConfig
    num_slots: int
    max_rank: int
    nblocks: int
    block_factors: bool
    dtype: str = "float32"

    @classmethod
    def for_plan(cls, config: ModelConfig, plan: ShardingPlan, max_loras: int, max_rank: int, dtype: str) -> "BankLayout":
        return cls(config, max_loras + 1, max_rank, plan.model_size, plan.block_factors, dtype)

    def factor_shapes(self, module: str) -> tuple[tuple[tuple[int, ...], tuple], tuple[tuple[int, ...], tuple]]:
        """((A shape, A logical axes), (B shape, B logical axes)) of one module, slot dim first."""
        s, r, n = self.num_slots, self.max_rank, self.nblocks
        d_in, d_out = self.config.module_dims(module)
        a_axes, b_axes = factor_axes(module, self.block_factors)
        if module in COLUMN_MODULES:
            a_shape = (s, d_in, r)
            b_shape = (s, n, r // n, d_out // n) if self.block_factors else (s, r, d_out)
        else:
            a_shape = (s, n, d_in // n, r // n) if self.block_factors else (s, d_in, r)
            b_shape = (s, r, d_out)
        return (a_shape, a_axes), (b_shape, b_axes)

    def keys(self) -> list[tuple[int, str]]:
        return [(layer, module) for layer in range(self.config.num_layers) for module in LORA_MODULES]


def bank_specs(layout: BankLayout, plan: ShardingPlan) -> dict[str, tuple]:
    """PartitionSpecs of every factor, keyed like the bank."""
    out = {}
    for layer, module in layout.keys():
        (_, a_axes), (_, b_axes) = layout.factor_shapes(module)
        out[bank_key(layer, module)] = (plan.spec(a_axes), plan.spec(b_axes))
    return out


def abstract_bank(layout: BankLayout, plan: ShardingPlan) -> dict[str, tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]:
    """Shapes, dtypes and shardings of the bank without allocating it (for compiling from abstract shapes)."""
    out = {}
    for layer, module in layout.keys():
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


def _dense_slot(factors: ModuleFactors, scale: float, shapes) -> tuple[np.ndarray, np.ndarray]:
    (a_shape, _), (b_shape, _) = shapes
    a, b = np.zeros(a_shape[1:], np.float32), np.zeros(b_shape[1:], np.float32)
    r = factors.rank
    a[:, :r] = factors.dense_a()
    b[:r, :] = scale * factors.dense_b()
    return a, b


def _block_slot(factors: ModuleFactors, scale: float, module: str, layout: BankLayout, where: str):
    """Per-device blocks of a bdlora slot: whole adapter blocks per device, or a dense factor served exactly.

    A dense factor (plain LoRA, or the non-block partner) of rank r is served as a block-diagonal adapter of
    rank r·N: every device gets the whole A (column) or its input slice of A (row) and its output slice of
    B (column) or the whole B (row). That needs r <= max_lora_rank / N.
    """
    (a_shape, _), (b_shape, _) = layout.factor_shapes(module)
    a, b = np.zeros(a_shape[1:], np.float32), np.zeros(b_shape[1:], np.float32)
    n, rb, r = layout.nblocks, layout.max_rank // layout.nblocks, factors.rank
    dense_a, dense_b = factors.dense_a(), scale * factors.dense_b()
    column = module in COLUMN_MODULES
    blocks = factors.b_blocks if column else factors.a_blocks
    if blocks > 1 and blocks % n:
        raise AdapterError(
            f"adapter {where}: nblocks={blocks} is not a multiple of the model-axis size {n}; under strategy "
            f"'bdlora' each device must own whole blocks (use a mesh whose model axis divides {blocks}, "
            "or strategy 'replicated' or 'slora')"
        )
    if blocks == 1 and r > rb:
        raise AdapterError(
            f"adapter {where}: {module} has a dense factor of rank {r}; under strategy 'bdlora' on a model axis "
            f"of {n} it is served exactly as a block-diagonal adapter of rank {r * n}, which needs "
            f"max_lora_rank >= {r * n} (have {layout.max_rank}); or use strategy 'replicated' or 'slora'"
        )
    step = r // n if blocks > 1 else r
    d_in, d_out = layout.config.module_dims(module)
    for i in range(n):
        rank_slice = slice(i * step, (i + 1) * step) if blocks > 1 else slice(0, r)
        if column:
            out_slice = slice(i * d_out // n, (i + 1) * d_out // n)
            a[:, i * rb:i * rb + step] = dense_a[:, rank_slice]
            b[i, :step, :] = dense_b[rank_slice, out_slice]
        else:
            in_slice = slice(i * d_in // n, (i + 1) * d_in // n)
            a[i, :, :step] = dense_a[in_slice, rank_slice]
            b[i * rb:i * rb + step, :] = dense_b[rank_slice, :]
    return a, b


def slot_arrays(adapter: LoraAdapter, layout: BankLayout) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Host arrays of one bank slot for an adapter (zeros for modules it does not adapt); validates the fit."""
    if adapter.rank > layout.max_rank:
        raise AdapterError(f"adapter {adapter.name!r}: rank {adapter.rank} exceeds max_lora_rank={layout.max_rank}")
    out = {}
    for layer, module in layout.keys():
        factors = adapter.modules.get((layer, module))
        shapes = layout.factor_shapes(module)
        if factors is None:
            (a_shape, _), (b_shape, _) = shapes
            out[bank_key(layer, module)] = (np.zeros(a_shape[1:], np.float32), np.zeros(b_shape[1:], np.float32))
        elif layout.block_factors:
            out[bank_key(layer, module)] = _block_slot(factors, adapter.scale, module, layout, repr(adapter.name))
        else:
            out[bank_key(layer, module)] = _dense_slot(factors, adapter.scale, shapes)
    return out


@partial(jax.jit, donate_argnums=0)
def _write_slot(bank, slot, arrays):
    return jax.tree.map(lambda full, new: full.at[slot].set(new.astype(full.dtype)), bank, arrays)


def write_slot(bank: dict, slot: int, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Write one slot of the bank in place (the old bank buffers are donated); compiles once per bank shape."""
    if not 0 < slot < next(iter(bank.values()))[0].shape[0]:
        raise IndexError(f"slot {slot} is outside 1..{next(iter(bank.values()))[0].shape[0] - 1}")
    return _write_slot(bank, jnp.int32(slot), arrays)
