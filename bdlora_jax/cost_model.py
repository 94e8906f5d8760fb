"""A GPU cost model of one decode step: roofline compute/memory time plus ring-model collective time.

Inputs are a `StepCost` (per-device FLOPs and HBM bytes, the collectives with their bytes, the model-axis
size N) and a `DeviceProfile` (configs/devices/*.yaml). The prediction is

    max(flops / peak_flops, bytes / hbm_bandwidth) + Σ_collectives (latency + k · bytes / link_bandwidth)

with k = 2(N-1)/N for an all-reduce (bytes = the reduced buffer), (N-1)/N for an all-gather (bytes = the
gathered output) and N-1 for a reduce-scatter (bytes = the scattered output, so (N-1)/N of its input). The
collectives are added, not overlapped: in a tensor-parallel decode step each one sits on the critical path.

`step_cost` builds a StepCost from a decode step compiled on the host (comm.py's abstract shapes). What
the CPU backend reports there, and what is used:
- FLOPs: `compiled.cost_analysis()["flops"]` is per device (the SPMD-partitioned module is one device's
  program): for the S-LoRA rank-16 step of Llama-3.1-8B at 1x8, batch 16, context 2048 it reports
  33.09 GFLOP against 32.33 GFLOP of matmul + attention + LoRA from `analytic_flops` (the rest is
  elementwise work). It is used, with `analytic_flops` as the fallback where cost_analysis gives nothing.
- Bytes: cost_analysis's "bytes accessed" is 9.71 GB per device for that step, 4x the 2.42 GB of weights
  + KV cache + adapter that the step must read: it sums the operands and results of the CPU compiler's
  own (less fused) ops and float32 conversions, which is not GPU HBM traffic. So bytes are always
  `analytic_bytes` (weights + KV cache read + the adapters' factors), computed from the model config.
- Collectives: counted in the compiled HLO by comm.count_collectives, one instruction at a time; those the
  CPU backend promoted from bf16 to float32 ("promoted") move half their CPU bytes on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from .adapters.bank import BankLayout
from .comm import DecodeShape, compile_decode_step, count_collectives
from .config import LORA_MODULES, ModelConfig
from .model.llama import cache_shapes
from .sharding import KEY_CACHE_AXES, VALUE_CACHE_AXES, ShardingPlan, weight_axes

PROFILE_FIELDS = ("hbm_bandwidth", "peak_flops", "collective_latency", "link_bandwidth")
RING_FACTORS = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
                "reduce-scatter": lambda n: n - 1}


@dataclass(frozen=True)
class DeviceProfile:
    """One GPU as the cost model sees it; rates in bytes/s and FLOP/s, latency in s, each with its source."""

    name: str
    hbm_bandwidth: float
    peak_flops: float
    collective_latency: float
    link_bandwidth: float
    sources: Mapping[str, str]


def load_device_profile(path: str | Path) -> DeviceProfile:
    """Read a configs/devices/*.yaml profile; a missing or bad field raises ValueError naming file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read device profile ({e.strerror})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of device profile fields, got {type(data).__name__}")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError(f"{path}: field 'name' must be a non-empty string")
    values = {}
    for field in PROFILE_FIELDS:
        if field not in data:
            raise ValueError(f"{path}: missing field {field!r}")
        value = data[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            hint = " (YAML reads 1.0e9 as text: write 1.0e+9)" if isinstance(value, str) else ""
            raise ValueError(f"{path}: field {field!r} = {value!r}: expected a positive number{hint}")
        values[field] = float(value)
    sources = data.get("sources")
    if not isinstance(sources, dict):
        raise ValueError(f"{path}: missing field 'sources' (a mapping from each of {PROFILE_FIELDS} to its source)")
    for field in PROFILE_FIELDS:
        if not isinstance(sources.get(field), str) or not sources[field].strip():
            raise ValueError(f"{path}: field 'sources.{field}' must say where the number comes from")
    unknown = set(data) - {"name", "sources", *PROFILE_FIELDS}
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; expected name, sources, {', '.join(PROFILE_FIELDS)}")
    return DeviceProfile(name=data["name"], sources=dict(sources), **values)


@dataclass(frozen=True)
class Collectives:
    """`count` collectives of one kind moving `bytes` in total (all-reduce: buffer; all-gather: output)."""

    kind: str
    count: int
    bytes: int


@dataclass(frozen=True)
class StepCost:
    """What one decode step costs per device: FLOPs, HBM bytes and collectives over a model axis of size N."""

    flops: float
    bytes_moved: float
    collectives: tuple[Collectives, ...]
    model_size: int
    flops_source: str = "given"


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of a step: compute and memory roofline parts, communication, and the total."""

    compute: float
    memory: float
    communication: float

    @property
    def total(self) -> float:
        return max(self.compute, self.memory) + self.communication


def collective_seconds(group: Collectives, n: int, profile: DeviceProfile) -> float:
    """Ring-model time of `group.count` collectives over n devices: latency each plus bytes over the link."""
    if group.kind not in RING_FACTORS:
        raise ValueError(f"collective kind {group.kind!r} has no cost model; expected one of {sorted(RING_FACTORS)}")
    if n == 1:
        return 0.0
    return group.count * profile.collective_latency + RING_FACTORS[group.kind](n) * group.bytes / profile.link_bandwidth


def predict(cost: StepCost, profile: DeviceProfile) -> StepTime:
    """The step time of `cost` on `profile`: roofline of compute and memory plus every collective, unoverlapped."""
    communication = sum(collective_seconds(g, cost.model_size, profile) for g in cost.collectives)
    return StepTime(compute=cost.flops / profile.peak_flops, memory=cost.bytes_moved / profile.hbm_bandwidth,
                    communication=communication)


def speedup(baseline: StepCost, candidate: StepCost, profile: DeviceProfile) -> float:
    """How many times faster the candidate step is than the baseline step on `profile`."""
    return predict(baseline, profile).total / predict(candidate, profile).total


def gpu_collectives(hlo_text: str) -> tuple[Collectives, ...]:
    """Collectives of compiled HLO by kind, with GPU bytes: a bf16 all-reduce the CPU promoted moves half."""
    totals: dict[str, list[int]] = {}
    for line in hlo_text.splitlines():
        for kind, entry in count_collectives(line).items():
            size = entry["bytes"] // 2 if entry.get("promoted") else entry["bytes"]
            total = totals.setdefault(kind, [0, 0])
            total[0] += entry["count"]
            total[1] += size
    return tuple(Collectives(kind, count, size) for kind, (count, size) in sorted(totals.items()))


def _local_numel(shape: tuple[int, ...], axes: tuple, plan: ShardingPlan) -> int:
    """Elements of one device's shard of an array with these logical axes."""
    numel = 1
    for dim, mesh_axis in zip(shape, tuple(plan.spec(axes)) + (None,) * len(shape)):
        numel *= dim // (plan.mesh.shape[mesh_axis] if mesh_axis is not None else 1)
    return numel


def _weight_numel(config: ModelConfig, plan: ShardingPlan) -> int:
    """Per-device elements of the matmul weights read each step: every layer's linears and the LM head."""
    per_layer = sum(_local_numel(config.module_dims(m), weight_axes(m), plan) for m in LORA_MODULES)
    return config.num_layers * per_layer + _local_numel((config.hidden_size, config.vocab_size), ("embed", "vocab"), plan)


def _adapter_numel(config: ModelConfig, plan: ShardingPlan, shape: DecodeShape) -> int:
    """Per-device elements of one adapter slot's factors over all layers and modules."""
    layout = BankLayout.for_plan(config, plan, shape.max_loras, shape.rank, shape.dtype)
    per_layer = 0
    for module in LORA_MODULES:
        for factor_shape, axes in layout.factor_shapes(module):
            per_layer += _local_numel(factor_shape[1:], axes[1:], plan)
    return config.num_layers * per_layer


def _local_rows(plan: ShardingPlan, shape: DecodeShape) -> int:
    return shape.batch // plan.data_size


def analytic_flops(config: ModelConfig, plan: ShardingPlan, shape: DecodeShape, with_lora: bool) -> float:
    """Per-device matmul FLOPs of a decode step: 2 per weight element per row, attention over the whole cache."""
    rows = _local_rows(plan, shape)
    heads = _local_numel((config.num_heads,), ("q_heads",), plan)
    attention = config.num_layers * 4 * rows * heads * config.head_dim * shape.max_seq_len
    lora = 2 * rows * _adapter_numel(config, plan, shape) if with_lora else 0
    return 2 * rows * _weight_numel(config, plan) + attention + lora


def analytic_bytes(config: ModelConfig, plan: ShardingPlan, shape: DecodeShape, with_lora: bool,
                   adapters: int = 1) -> float:
    """Per-device HBM bytes of a decode step: weights, the whole KV cache once, and `adapters` adapters' factors.

    Activations, norms and the embedding rows are left out (well under 1% at Llama sizes).
    """
    itemsize = jnp.dtype(shape.dtype).itemsize
    shapes = cache_shapes(config, shape.batch, shape.max_seq_len)
    kv = config.num_layers * sum(_local_numel(cache, axes, plan)
                                 for cache, axes in zip(shapes, (KEY_CACHE_AXES, VALUE_CACHE_AXES)))
    lora = adapters * _adapter_numel(config, plan, shape) if with_lora else 0
    return itemsize * (_weight_numel(config, plan) + kv + lora)


def _reported_flops(compiled: jax.stages.Compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def step_cost(config: ModelConfig, plan: ShardingPlan, shape: DecodeShape, with_lora: bool = True,
              adapters: int = 1) -> StepCost:
    """StepCost of a compiled decode step: cost_analysis FLOPs (analytic if absent), analytic bytes, HLO collectives."""
    compiled = compile_decode_step(config, plan, shape, with_lora)
    flops = _reported_flops(compiled)
    source = "cost_analysis"
    if flops is None:
        flops, source = analytic_flops(config, plan, shape, with_lora), "analytic"
    return StepCost(flops=flops, bytes_moved=analytic_bytes(config, plan, shape, with_lora, adapters),
                    collectives=gpu_collectives(compiled.as_text()), model_size=plan.model_size, flops_source=source)
