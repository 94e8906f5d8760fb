"""Communication accounting: compile one decode step from abstract shapes and count its collectives.

Nothing is allocated, so the full Llama-3.1-8B / 70B decode step compiles on emulated CPU devices. The
counts come from the compiled (post-partitioning) HLO: each collective by kind, with the bytes it outputs.
Bytes are those of the platform that compiled it: the CPU backend reduces bfloat16 all-reduces in float32
(their reduction is marked "_promoted"), so those are counted under "promoted" and their bytes are the
float32 bytes actually moved there; on a GPU the same all-reduce moves half as many.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from .adapters.bank import BankLayout, abstract_bank
from .adapters.compressed import CompressedLayout, abstract_compressed
from .config import ModelConfig
from .model.llama import AdapterBatch, abstract_cache, abstract_model, forward, param_shardings
from .sharding import ShardingPlan

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


@dataclass(frozen=True)
class DecodeShape:
    """The decode step being compiled: batch rows, KV-cache length, and the adapter bank's size."""

    batch: int = 16
    max_seq_len: int = 2048
    max_loras: int = 8
    rank: int = 16
    dtype: str = "bfloat16"


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"[, "promoted"]}} for every collective in HLO text (async starts counted once)."""
    stats = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        result_type, kind = match.group(1), match.group(2)
        shapes = _SHAPE.findall(result_type)
        if match.group(3):  # an async start returns (operands, outputs): count the outputs only
            shapes = shapes[len(shapes) // 2:]
        size = sum(_DTYPE_BYTES[dt] * _numel(dims) for dt, dims in shapes)
        entry = stats.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
        if "_promoted" in line:
            entry["promoted"] = entry.get("promoted", 0) + 1
    return stats


def _numel(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def _abstract_params(config: ModelConfig, plan: ShardingPlan, dtype):
    graphdef, abstract_state = abstract_model(config, plan, dtype)
    shardings = param_shardings(abstract_state, plan)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return graphdef, state


def compile_decode_step(config: ModelConfig, plan: ShardingPlan, shape: DecodeShape, with_lora: bool,
                        compressed: CompressedLayout | None = None) -> jax.stages.Compiled:
    """One decode step (one token per row, cache donated) compiled from abstract shapes, with or without adapters.

    compressed: also serve a compressed bank of this layout (needs with_lora: it rides on the adapter batch).
    """
    if compressed is not None and not with_lora:
        raise ValueError("a compressed bank is served beside the adapter bank: pass with_lora=True")
    dtype = jnp.dtype(shape.dtype)
    graphdef, state = _abstract_params(config, plan, dtype)
    row = plan.sharding(("batch",))
    tokens = jax.ShapeDtypeStruct((shape.batch, 1), jnp.int32, sharding=plan.sharding(("batch", "seq")))
    start = jax.ShapeDtypeStruct((shape.batch,), jnp.int32, sharding=row)
    cache = abstract_cache(config, plan, shape.batch, shape.max_seq_len, dtype)
    adapters = None
    if with_lora:
        layout = BankLayout.for_plan(config, plan, shape.max_loras, shape.rank, shape.dtype)
        ids = jax.ShapeDtypeStruct((shape.batch,), jnp.int32, sharding=row)
        adapters = AdapterBatch(abstract_bank(layout, plan), ids)
        if compressed is not None:
            adapters = adapters._replace(compressed=abstract_compressed(compressed, plan, shape.dtype), clusters=ids,
                                         sigma_ids=ids)
    step = jax.jit(partial(forward, graphdef), donate_argnums=(3,))
    return step.lower(state, tokens, start, cache, adapters).compile()


def communication_report(config: ModelConfig, plan: ShardingPlan, shape: DecodeShape) -> dict:
    """Collectives of the base decode step, with the strategy's adapters, and the difference (extra)."""
    base = count_collectives(compile_decode_step(config, plan, shape, with_lora=False).as_text())
    with_lora = count_collectives(compile_decode_step(config, plan, shape, with_lora=True).as_text())
    extra = {}
    for kind in sorted(set(base) | set(with_lora)):
        b, w = base.get(kind, {"count": 0, "bytes": 0}), with_lora.get(kind, {"count": 0, "bytes": 0})
        extra[kind] = {"count": w["count"] - b["count"], "bytes": w["bytes"] - b["bytes"]}
    return {"base": base, "with_lora": with_lora, "extra": extra, "platform": plan.mesh.devices.flat[0].platform}
