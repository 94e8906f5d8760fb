"""Adapter operands of a linear layer: the adapter bank's (A, B) and a compressed bank's (V, U, Σ), each with its
PartitionSpecs and its per-device delta (XLA grouped GEMM, Pallas kernels, or the compressed grouped GEMM)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from .compressed_delta import compressed_delta
from .grouped import block_lora_delta, grouped_lora_delta
from .linear import RESOLVED_LORA_IMPLS, DeltaContext, LoraLayout
from .pallas_delta import pallas_lora_add
from .routing import Routing


def _dropout_mask(key: jax.Array, rate: jax.Array, x: jax.Array, ctx: DeltaContext) -> jax.Array:
    """This device's slice of one global LoRA-dropout mask over x, so every mesh drops the same entries."""
    mesh, x_spec = ctx.specs.mesh, ctx.specs.x
    axes = tuple(x_spec) + (None,) * (x.ndim - len(x_spec))
    sizes = [mesh.shape[a] if a is not None else 1 for a in axes]
    keep = jax.random.bernoulli(key, 1.0 - rate, tuple(d * s for d, s in zip(x.shape, sizes)))
    starts = [jax.lax.axis_index(a) * d if a is not None else 0 for a, d in zip(axes, x.shape)]
    return jax.lax.dynamic_slice(keep, starts, x.shape)


@dataclass(frozen=True)
class LoraOperand:
    """One module's slice of the adapter bank: A and B stacked over slots, with their specs.

    lora_impl: "xla" (grouped GEMM), "pallas" (Triton kernels) or "pallas_interpret" (the kernels in interpret mode).
    dropout = (key, rate) applies LoRA dropout to the adapter's input (training only; xla).
    """

    a: jax.Array
    b: jax.Array
    a_spec: PartitionSpec
    b_spec: PartitionSpec
    lora_impl: str = "xla"
    dropout: tuple[jax.Array, jax.Array] | None = None

    def __post_init__(self):
        if self.lora_impl not in RESOLVED_LORA_IMPLS:
            raise ValueError(f"lora_impl={self.lora_impl!r}: expected one of {RESOLVED_LORA_IMPLS}")
        if self.dropout is not None and self.lora_impl != "xla":
            raise ValueError("LoRA dropout is a training feature of the xla implementation")

    @property
    def arrays(self) -> tuple:
        return (self.a, self.b, self.dropout)

    @property
    def specs(self) -> tuple:
        return (self.a_spec, self.b_spec, None if self.dropout is None else (PartitionSpec(), PartitionSpec()))

    @property
    def checks_vma(self) -> bool:
        return self.lora_impl == "xla"

    def layout(self) -> LoraLayout:
        return LoraLayout.from_specs(self.a_spec, self.b_spec, self.a.ndim, self.b.ndim)

    def add(self, y: jax.Array, x: jax.Array, arrays: tuple, routing: Routing, ctx: DeltaContext) -> jax.Array:
        a, b, dropout = arrays
        layout = ctx.layout
        if self.lora_impl != "xla":
            return pallas_lora_add(x, y, a, b, routing, layout.a_block, layout.b_block, ctx.join, ctx.into_slice,
                                   interpret=self.lora_impl == "pallas_interpret")
        if dropout is not None:
            key, rate = dropout
            x = jnp.where(_dropout_mask(key, rate, x, ctx), x / (1.0 - rate), 0.0).astype(x.dtype)
        if routing.block_slots is not None:
            return ctx.add(y, block_lora_delta(x, a, b, routing.block_slots, layout.a_block, layout.b_block, ctx.join))
        collective = layout.gather_rank or layout.reduce_rank
        return ctx.add(y, grouped_lora_delta(x, a, b, routing, layout.a_block, layout.b_block, ctx.join, collective))


@dataclass(frozen=True)
class CompressedOperand:
    """One module's slice of a compressed bank: shared bases V, U per cluster and Σ per adapter, with their specs."""

    v: jax.Array
    u: jax.Array
    sigma: jax.Array
    v_spec: PartitionSpec
    u_spec: PartitionSpec
    sigma_spec: PartitionSpec
    checks_vma: bool = True

    @property
    def arrays(self) -> tuple:
        return (self.v, self.u, self.sigma)

    @property
    def specs(self) -> tuple:
        return (self.v_spec, self.u_spec, self.sigma_spec)

    def layout(self) -> LoraLayout:
        return LoraLayout.from_specs(self.v_spec, self.u_spec, self.v.ndim, self.u.ndim)

    def add(self, y: jax.Array, x: jax.Array, arrays: tuple, routing: Routing, ctx: DeltaContext) -> jax.Array:
        v, u, sigma = arrays
        return ctx.add(y, compressed_delta(x, v, u, sigma, routing, ctx.layout.a_block, ctx.layout.b_block, ctx.join))
