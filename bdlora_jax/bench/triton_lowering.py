"""One decode step of the model with lora_impl="pallas", lowered for a GPU platform from abstract shapes on any
host (lowering needs no GPU), and the Triton kernels it calls (used by `bench lower`)."""

from __future__ import annotations

import re
from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from ..adapters.bank import BankLayout, abstract_bank
from ..comm import DecodeShape
from ..config import ModelConfig
from ..model.llama import AdapterBatch, abstract_cache, abstract_model, forward, param_shardings
from ..sharding import ShardingPlan

_TRITON_CALL = re.compile(r"@__gpu\$xla\.gpu\.triton\(.*?grid_x = (\d+).*?grid_y = (\d+).*?grid_z = (\d+).*?"
                          r'name = "([^"]+)"')


def lower_decode_step(config: ModelConfig, plan: ShardingPlan, shape: DecodeShape, lora_impl: str = "pallas",
                      platform: str = "cuda") -> str:
    """StableHLO text of one decode step with adapters, lowered for `platform` from abstract shapes (no allocation)."""
    dtype = jnp.dtype(shape.dtype)
    graphdef, abstract_state = abstract_model(config, plan, dtype, lora_impl)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        abstract_state, param_shardings(abstract_state, plan), is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    row = plan.sharding(("batch",))
    tokens = jax.ShapeDtypeStruct((shape.batch, 1), jnp.int32, sharding=plan.sharding(("batch", "seq")))
    start = jax.ShapeDtypeStruct((shape.batch,), jnp.int32, sharding=row)
    cache = abstract_cache(config, plan, shape.batch, shape.max_seq_len, dtype)
    layout = BankLayout.for_plan(config, plan, shape.max_loras, shape.rank, shape.dtype)
    adapters = AdapterBatch(abstract_bank(layout, plan), jax.ShapeDtypeStruct((shape.batch,), jnp.int32, sharding=row))
    step = jax.jit(partial(forward, graphdef), donate_argnums=(3,))
    return step.trace(state, tokens, start, cache, adapters).lower(lowering_platforms=(platform,)).as_text()


def triton_kernels(hlo_text: str) -> dict[str, dict]:
    """{kernel name: {"count", "grids"}} of the Triton custom calls in lowered StableHLO text."""
    found: dict[str, Counter] = {}
    for line in hlo_text.splitlines():
        match = _TRITON_CALL.search(line)
        if match:
            grid = "x".join(match.group(i) for i in (1, 2, 3))
            found.setdefault(match.group(4), Counter())[grid] += 1
    return {name: {"count": sum(grids.values()), "grids": dict(grids)} for name, grids in sorted(found.items())}


def lower_report(config: ModelConfig, plan: ShardingPlan, shape: DecodeShape, platform: str) -> dict:
    """The Triton kernels of one pallas decode step lowered for `platform`, in total and per layer."""
    kernels = triton_kernels(lower_decode_step(config, plan, shape, "pallas", platform))
    total = sum(k["count"] for k in kernels.values())
    return {"platform": platform, "triton_calls": total, "per_layer": total / config.num_layers, "kernels": kernels}
