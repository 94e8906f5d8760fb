"""One Llama layer's per-device LoRA work timed for several implementations (used by `bench kernel`).

The shrink and expand of the 7 adapted modules, with the factor shapes one device holds at the given model-axis
size and strategy, are timed side by side for the Pallas kernels, XLA's per-token gather (the "xla" lora_impl),
a one-hot einsum over the bank (sglang-jax, vLLM-TPU) and lax.ragged_dot on tokens sorted by adapter. Achieved
bandwidth = the bytes that must move (the tokens' activations, each distinct adapter's factors once, the float32
outputs) / time, against the device's peak. It needs a GPU; without one the report says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from ..adapters.bank import BankLayout
from ..config import LORA_MODULES, ModelConfig
from ..kernels import bgmv_expand, bgmv_shrink, group_by_slot, reference, sgmv_expand, sgmv_shrink
from ..mesh import DATA, MODEL
from ..sharding import make_plan

METHODS = ("pallas", "xla_gather", "onehot_einsum", "ragged_dot")
MODES = ("decode", "prefill")
# Peak HBM bandwidth in GB/s by substring of jax's device_kind (vendor data sheets); first match wins.
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
             ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0), ("A10G", 600.0))


@dataclass(frozen=True)
class ModuleShape:
    """One module's per-device factors: A (slots, a_blocks, d_in, a_rank) and B (slots, b_blocks, b_rank, d_out)."""

    module: str
    a: tuple[int, int, int]
    b: tuple[int, int, int]


def _local(shape: tuple[int, ...], spec: PartitionSpec, model_size: int) -> tuple[int, ...]:
    axes = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(d // model_size if axis == MODEL else d for d, axis in zip(shape, axes))


def local_shapes(config: ModelConfig, strategy: str, model_size: int, rank: int) -> list[ModuleShape]:
    """Per-device factor shapes of every adapted module, from the strategy's real rules table and bank layout."""
    plan = make_plan(AbstractMesh((1, model_size), (DATA, MODEL)), strategy, config, rank)
    layout = BankLayout.for_plan(config, plan, 1, rank, "bfloat16")
    shapes = []
    for module in LORA_MODULES:
        (a_shape, a_axes), (b_shape, b_axes) = layout.factor_shapes(module)
        a = _local(a_shape, plan.spec(a_axes), model_size)[1:]
        b = _local(b_shape, plan.spec(b_axes), model_size)[1:]
        shapes.append(ModuleShape(module, a if len(a) == 3 else (1, *a), b if len(b) == 3 else (1, *b)))
    return shapes


def _pallas(mode: str, interpret: bool) -> Callable:
    def run(x, a, h, b, y, slots):
        if mode == "decode":
            return bgmv_shrink(x, a, slots, interpret=interpret), bgmv_expand(h, b, slots, y, interpret=interpret)
        order, sizes = group_by_slot(slots, a.shape[0])
        return (sgmv_shrink(x, a, order, sizes, interpret=interpret),
                sgmv_expand(h, b, order, sizes, y, interpret=interpret))
    return run


def _xla_gather(x, a, h, b, y, slots):
    return reference.shrink(x, a, slots), reference.expand(h, b, slots, y)


def _onehot_einsum(x, a, h, b, y, slots):
    onehot = jax.nn.one_hot(slots, a.shape[0], dtype=x.dtype)
    hs = jnp.einsum("ts,tnd,sndr->tnr", onehot, x, a, preferred_element_type=jnp.float32)
    return hs, y + jnp.einsum("ts,tnr,snro->tno", onehot, h, b, preferred_element_type=jnp.float32)


def _ragged_dot(x, a, h, b, y, slots):
    order, sizes = group_by_slot(slots, a.shape[0])
    inverse = jnp.argsort(order)

    def grouped(lhs, rhs):  # ragged_dot per block, on rows sorted by slot
        return jnp.stack([jax.lax.ragged_dot(lhs[order, i], rhs[:, i], sizes, preferred_element_type=jnp.float32)
                          for i in range(lhs.shape[1])], axis=1)[inverse]

    return grouped(x, a), y + grouped(h, b)


def methods(mode: str, interpret: bool = False) -> dict[str, Callable]:
    """name -> fn(x, a, h, b, y, slots) -> (x·A[slot], y + h·B[slot]) for one module (pallas: the mode's kernels)."""
    return {"pallas": _pallas(mode, interpret), "xla_gather": _xla_gather, "onehot_einsum": _onehot_einsum,
            "ragged_dot": _ragged_dot}


def token_slots(mode: str, tokens: int, adapters: int, seed: int = 0) -> np.ndarray:
    """Decode: requests cycle through the adapters in random order; prefill: contiguous prompts, one per adapter."""
    if mode == "decode":
        return (1 + np.random.default_rng(seed).permutation(np.arange(tokens) % adapters)).astype(np.int32)
    return (1 + np.arange(tokens) * adapters // tokens).astype(np.int32)


def layer_inputs(shapes: list[ModuleShape], tokens: int, num_slots: int, dtype, seed: int = 0) -> list[tuple]:
    """Random (x, a, h, b, y) per module; slot 0 of every factor is zero, as in the bank."""
    key = jax.random.key(seed)
    out = []
    for s in shapes:
        key, *keys = jax.random.split(key, 5)
        (nb_a, d_in, r_a), (nb_b, r_b, d_out) = s.a, s.b
        a = (0.1 * jax.random.normal(keys[0], (num_slots, nb_a, d_in, r_a))).astype(dtype).at[0].set(0)
        b = (0.1 * jax.random.normal(keys[1], (num_slots, nb_b, r_b, d_out))).astype(dtype).at[0].set(0)
        x = jax.random.normal(keys[2], (tokens, nb_a, d_in)).astype(dtype)
        h = jax.random.normal(keys[3], (tokens, nb_b, r_b)).astype(dtype)
        out.append((x, a, h, b, jnp.zeros((tokens, nb_b, d_out), jnp.float32)))
    return out


def moved_bytes(shapes: list[ModuleShape], tokens: int, adapters: int, itemsize: int) -> int:
    """Bytes one layer's LoRA must move: activations in, each distinct adapter's factors once, float32 outputs."""
    total = 0
    for s in shapes:
        (nb_a, d_in, r_a), (nb_b, r_b, d_out) = s.a, s.b
        total += (tokens * nb_a * d_in + adapters * nb_a * d_in * r_a) * itemsize + tokens * nb_a * r_a * 4
        total += (tokens * nb_b * r_b + adapters * nb_b * r_b * d_out) * itemsize + 2 * tokens * nb_b * d_out * 4
    return total


def _median_seconds(fn: Callable, args: tuple, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bandwidth(device_kind: str) -> float | None:
    """The device's peak HBM bandwidth in GB/s, or None for a device not in PEAK_GBPS."""
    return next((gbps for name, gbps in PEAK_GBPS if name in device_kind), None)


def kernel_report(config: ModelConfig, strategy: str, model_size: int, ranks: list[int], adapters: list[int],
                  tokens: dict[str, int], dtype: str, iters: int) -> dict:
    """Time one layer's per-device LoRA for every method, mode, rank and adapter count (GPU only)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return {"gpu": False, "message": f"no GPU: jax sees {device.platform} devices only; the kernel benchmark "
                                         "times Triton kernels and needs a GPU (run it on a GPU host)"}
    peak = peak_bandwidth(device.device_kind)
    num_slots = max(adapters) + 1
    rows = []
    for rank in ranks:
        shapes = local_shapes(config, strategy, model_size, rank)
        for mode in MODES:
            inputs = layer_inputs(shapes, tokens[mode], num_slots, jnp.dtype(dtype))
            for count in adapters:
                slots = jnp.asarray(token_slots(mode, tokens[mode], count))
                nbytes = moved_bytes(shapes, tokens[mode], min(count, tokens[mode]), jnp.dtype(dtype).itemsize)
                results = {}
                for name, fn in methods(mode).items():
                    layer = jax.jit(lambda inputs, slots, fn=fn: [fn(*m, slots) for m in inputs])
                    results[name] = _median_seconds(layer, (inputs, slots), iters)
                for name, seconds in results.items():
                    gbps = nbytes / seconds / 1e9
                    rows.append({"mode": mode, "rank": rank, "adapters": count, "tokens": tokens[mode], "method": name,
                                 "us": seconds * 1e6, "gbps": gbps, "peak_fraction": gbps / peak if peak else None,
                                 "speedup_vs_xla_gather": results["xla_gather"] / seconds})
    return {"gpu": True, "device": device.device_kind, "peak_gbps": peak, "rows": rows}
