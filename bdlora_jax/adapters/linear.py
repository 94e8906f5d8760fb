"""The multi-adapter linear layer y = x·W + Σ operands' per-token deltas under one shard_map, for every strategy.

This module keeps only the shard_map and the strategy's collectives. Each adapter operand (adapters/operands.py: the
adapter bank, a compressed bank) brings its arrays, their PartitionSpecs and its per-device delta; the forward's
routing (adapters/routing.py) says which token uses which adapter. What each device holds follows from the
PartitionSpecs that the strategy's rules table resolves to, and so do the collectives: a rank-sliced x·A that
meets a full-rank B is all-gathered (S-LoRA column modules), a partial-sum x·A that meets an output-sharded B is
all-reduced (S-LoRA row modules), and everything else stays local, folding row-parallel partial sums into the
base model's one all-reduce.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ..mesh import MODEL
from .routing import Routing, routing_specs

PARTIAL, SLICE, FULL = "partial", "slice", "full"
RESOLVED_LORA_IMPLS = ("xla", "pallas", "pallas_interpret")


def resolve_lora_impl(lora_impl: str, platform: str) -> str:
    """The resolved lora_impl a model runs (RESOLVED_LORA_IMPLS) for a user's ("xla", "pallas", "auto") on a platform.

    "auto" is the Triton kernels on GPU and XLA elsewhere; "pallas" where there is no GPU is the same kernels
    in interpret mode (slow, for checking), since Triton code needs a GPU to run.
    """
    if lora_impl == "auto":
        return "pallas" if platform == "gpu" else "xla"
    if lora_impl == "pallas":
        return "pallas" if platform == "gpu" else "pallas_interpret"
    if lora_impl == "xla":
        return "xla"
    raise ValueError(f"lora_impl={lora_impl!r}: expected one of ('xla', 'pallas', 'auto')")


@dataclass(frozen=True)
class LoraLayout:
    """Where one module's adapter factors live, derived from their PartitionSpecs (slot dim first)."""

    a_block: bool
    b_block: bool
    gather_rank: bool
    reduce_rank: bool
    output: str

    @classmethod
    def from_specs(cls, a_spec: PartitionSpec, b_spec: PartitionSpec, a_ndim: int, b_ndim: int) -> LoraLayout:
        a_block, b_block = a_ndim == 4, b_ndim == 4
        a_axes = tuple(a_spec) + (None,) * (a_ndim - len(a_spec))
        b_axes = tuple(b_spec) + (None,) * (b_ndim - len(b_spec))
        if a_block:
            shrink_sliced, shrink_partial = a_axes[1] == MODEL, False
        else:
            shrink_partial, shrink_sliced = a_axes[1] == MODEL, a_axes[2] == MODEL
        b_wants_slice = b_axes[1] == MODEL
        b_out_sharded = b_axes[1] == MODEL if b_block else b_axes[2] == MODEL
        if b_wants_slice and not shrink_sliced:
            raise ValueError(f"inconsistent LoRA layout: A {a_spec} gives no rank slice for B {b_spec}")
        gather_rank = shrink_sliced and not b_wants_slice
        reduce_rank = shrink_partial and b_out_sharded
        partial = (shrink_partial and not reduce_rank) or (b_wants_slice and not b_block)
        output = PARTIAL if partial else (SLICE if b_out_sharded else FULL)
        return cls(a_block, b_block, gather_rank, reduce_rank, output)


def _join_rank(h: jax.Array, layout: LoraLayout) -> jax.Array:
    """The strategy's collective on the rank-sized x·A (last axis = rank): S-LoRA's all-gather or psum, else none."""
    if layout.gather_rank:
        h = jax.lax.all_gather(h, MODEL, axis=h.ndim - 1, tiled=True)
    if layout.reduce_rank:
        h = jax.lax.psum(h, MODEL)
    return h


def _place_slice(y: jax.Array, n: int) -> jax.Array:
    """Put this device's exact output slice into a zero (…, n·width) partial-sum buffer at its offset."""
    width = y.shape[-1]
    buffer = jnp.zeros(y.shape[:-1] + (n * width,), y.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buffer, y, jax.lax.axis_index(MODEL) * width, axis=2)


@dataclass(frozen=True)
class LinearSpecs:
    """How one linear layer is laid out: its mesh, the PartitionSpecs of x, w and y, and of the per-token routing."""

    mesh: jax.sharding.Mesh
    x: PartitionSpec
    w: PartitionSpec
    out: PartitionSpec
    rows: PartitionSpec

    @property
    def base_output(self) -> str:
        """What x·w leaves on each device: a row-parallel partial sum, an output slice, or the full output."""
        if len(self.w) and self.w[0] == MODEL:
            return PARTIAL
        return SLICE if len(self.w) > 1 and self.w[1] == MODEL else FULL


@dataclass(frozen=True)
class DeltaContext:
    """What an adapter operand needs inside the shard_map: its layout, the strategy's collective on its rank-sized
    x·A (`join`), whether its output slice goes into a partial-sum buffer, and the layer's specs."""

    layout: LoraLayout
    into_slice: bool
    model_size: int
    specs: LinearSpecs

    def join(self, h: jax.Array) -> jax.Array:
        return _join_rank(h, self.layout)

    def add(self, y: jax.Array, delta: jax.Array) -> jax.Array:
        """y plus a delta computed on this device's exact output slice (placed at its offset into a partial sum)."""
        return y + (_place_slice(delta, self.model_size) if self.into_slice else delta)


class AdapterOperand(Protocol):
    """Something that adds per-token adapter deltas to a linear layer (the adapter bank, a compressed bank)."""

    arrays: tuple
    specs: tuple
    checks_vma: bool

    def layout(self) -> LoraLayout: ...

    def add(self, y: jax.Array, x: jax.Array, arrays: tuple, routing: Routing, ctx: DeltaContext) -> jax.Array: ...


def adapted_linear(x: jax.Array, w: jax.Array, specs: LinearSpecs, operands: Sequence[AdapterOperand] = (),
                   routing: Routing | None = None) -> jax.Array:
    """x (batch, seq, d_in) · w (d_in, d_out) plus each operand's per-token adapter delta, in one shard_map.

    Row-parallel partial sums, adapters' included, end in one psum; routing is the forward's (adapters/routing.py).
    """
    base_output = specs.base_output
    row_parallel = base_output == PARTIAL
    n = specs.mesh.shape[MODEL]
    contexts = []
    for operand in operands:
        layout = operand.layout()
        if layout.output != base_output and not (base_output == PARTIAL and layout.output == SLICE):
            raise ValueError(f"{type(operand).__name__} output {layout.output} cannot join a {base_output} base "
                             f"output ({specs.w})")
        contexts.append(DeltaContext(layout, base_output == PARTIAL and layout.output == SLICE, n, specs))

    def local(x, w, routing, arrays):
        y = jnp.dot(x, w, preferred_element_type=jnp.float32)
        for operand, ctx, operand_arrays in zip(operands, contexts, arrays):
            y = operand.add(y, x, operand_arrays, routing, ctx)
        y = y.astype(x.dtype)
        return jax.lax.psum(y, MODEL) if row_parallel else y

    in_specs = (specs.x, specs.w, None if routing is None else routing_specs(routing, specs.rows),
                tuple(operand.specs for operand in operands))
    # A pallas_call's outputs carry no varying-axes type, so the kernels' shard_map skips that check (as JAX's own
    # Pallas GPU ops do); the specs above still say exactly what each device holds.
    check_vma = all(operand.checks_vma for operand in operands)
    return jax.shard_map(local, mesh=specs.mesh, in_specs=in_specs, out_specs=specs.out, check_vma=check_vma)(
        x, w, routing, tuple(operand.arrays for operand in operands))
