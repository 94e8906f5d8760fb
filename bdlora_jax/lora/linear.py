"""The multi-adapter linear layer y = x·W + (x·A[slot])·B[slot] under shard_map, for every strategy.

Each row of a batch names an adapter slot (slot 0 is all zeros: no adapter); the scale is already folded
into B. What each device holds follows from the PartitionSpecs that the strategy's rules table resolves to,
and so do the collectives: a rank-sliced x·A that meets a full-rank B is all-gathered (S-LoRA column
modules), a partial-sum x·A that meets an output-sharded B is all-reduced (S-LoRA row modules), and
everything else stays local, folding row-parallel partial sums into the base model's one all-reduce.

Two implementations of the per-device adapter math run inside the same shard_map (`impl`): "xla" gathers
each row's factors and multiplies with einsums; "pallas" runs the Triton kernels of bdlora_jax.kernels
(decode kernels for one-token rows, grouped prefill kernels otherwise), and "pallas_interpret" runs those
kernels in Pallas interpret mode, which needs no GPU. The collectives are the same for all three.

A compressed bank (lora/compressed.py) adds, in the same shard_map, each row's x·V[c]·Σᵀ·U[c]: the shared bases
are applied once per cluster per batch (tokens sorted by cluster, `jax.lax.ragged_dot` with group sizes), with
the strategy's collective on x·V exactly as on x·A. Every impl runs that part as the same XLA code.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ..kernels import bgmv_expand, bgmv_shrink, group_by_slot, sgmv_expand, sgmv_shrink
from ..mesh import MODEL

PARTIAL, SLICE, FULL = "partial", "slice", "full"
IMPLS = ("xla", "pallas", "pallas_interpret")


def resolve_impl(lora_impl: str, platform: str) -> str:
    """The `impl` a model runs for a user's lora_impl ("xla", "pallas", "auto") on a device platform.

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


def _lora_delta(x: jax.Array, slots: jax.Array, a: jax.Array, b: jax.Array, layout: LoraLayout) -> jax.Array:
    """Per-device LoRA contribution for rows that each use their own slot; h is kept in float32."""
    batch, seq = x.shape[:2]
    a_rows, b_rows = a[slots], b[slots]
    if layout.a_block:
        xb = x.reshape(batch, seq, a_rows.shape[1], a_rows.shape[2])
        h = jnp.einsum("bsnd,bndr->bsnr", xb, a_rows, preferred_element_type=jnp.float32).reshape(batch, seq, -1)
    else:
        h = jnp.einsum("bsd,bdr->bsr", x, a_rows, preferred_element_type=jnp.float32)
    h = _join_rank(h, layout).astype(b.dtype)
    if layout.b_block:
        hb = h.reshape(batch, seq, b_rows.shape[1], b_rows.shape[2])
        y = jnp.einsum("bsnr,bnro->bsno", hb, b_rows, preferred_element_type=jnp.float32).reshape(batch, seq, -1)
    else:
        y = jnp.einsum("bsr,bro->bso", h, b_rows, preferred_element_type=jnp.float32)
    return y


def _grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, block: bool) -> jax.Array:
    """x (tokens, d) sorted by group times each group's w (groups, d, k), or block-diagonal w (groups, nb, d/nb, k/nb)."""
    if not block:
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    xb = x.reshape(x.shape[0], w.shape[1], w.shape[2]).transpose(1, 0, 2)
    dims = jax.lax.RaggedDotDimensionNumbers((([2], [2]), ([0], [1])), lhs_ragged_dimensions=[1],
                                             rhs_group_dimensions=[0])
    y = jax.lax.ragged_dot_general(xb, w, group_sizes, dims, preferred_element_type=jnp.float32)
    return y.transpose(1, 0, 2).reshape(x.shape[0], -1)


def _cluster_order(row_clusters: jax.Array, num_clusters: int) -> tuple[jax.Array, jax.Array]:
    """(rows stably sorted by cluster, rows per cluster); a counting sort, as the clusters are few."""
    onehot = (row_clusters[:, None] == jnp.arange(num_clusters + 1)).astype(jnp.int32)
    counts = onehot.sum(axis=0)
    position = jnp.sum(onehot * (jnp.cumsum(counts) - counts + jnp.cumsum(onehot, axis=0) - onehot), axis=1)
    rows = jnp.zeros_like(position).at[position].set(jnp.arange(position.shape[0], dtype=position.dtype))
    return rows, counts[:num_clusters]


def _compressed_delta(x: jax.Array, clusters: jax.Array, sigma_ids: jax.Array, v: jax.Array, u: jax.Array,
                      sigma: jax.Array, layout: LoraLayout) -> jax.Array:
    """Per-device compressed contribution x·V[c]·Σ[id]ᵀ·U[c] of every row (Σ id 0: none), h kept in float32.

    Tokens are sorted by cluster (rows sorted, each row's tokens kept together) so each cluster's V and U multiply
    all its tokens in one grouped GEMM; rows without a compressed adapter are left out of every group (ragged_dot
    gives them zeros).
    """
    batch, seq = x.shape[:2]
    tokens, num_clusters = batch * seq, v.shape[0]
    rows, group_sizes = _cluster_order(jnp.where(sigma_ids > 0, clusters, num_clusters), num_clusters)
    order = (rows[:, None] * seq + jnp.arange(seq)).reshape(tokens)
    h = _grouped(x.reshape(tokens, -1)[order], v, group_sizes * seq, layout.a_block)
    h = _join_rank(h, layout)
    row_sigma = sigma[sigma_ids[rows]]  # (batch, nbΣ, r, r) in sorted row order; each row's tokens are contiguous
    h = jnp.einsum("bsnr,bnqr->bsnq", h.reshape(batch, seq, row_sigma.shape[1], row_sigma.shape[2]), row_sigma,
                   preferred_element_type=jnp.float32).reshape(tokens, -1).astype(u.dtype)
    y = _grouped(h, u, group_sizes * seq, layout.b_block)
    return jnp.zeros_like(y).at[order].set(y).reshape(batch, seq, -1)


def _lora_pallas(x: jax.Array, y: jax.Array, slots: jax.Array, a: jax.Array, b: jax.Array, layout: LoraLayout,
                 into_slice: bool, interpret: bool) -> jax.Array:
    """Per-device LoRA added into the float32 base output y by the kernels; into_slice: y is a full partial sum.

    Rows of one token (decode) use the BGMV kernels with each row's slot; longer rows are grouped by slot for
    the SGMV kernels. A dense factor is the one-block case of the kernels' block-diagonal layout.
    """
    batch, seq = x.shape[:2]
    tokens = batch * seq
    a4 = a if layout.a_block else a[:, None]
    b4 = b if layout.b_block else b[:, None]
    xt = x.reshape(tokens, a4.shape[1], a4.shape[2])
    if seq == 1:
        h = bgmv_shrink(xt, a4, slots, interpret=interpret)
    else:
        order, group_sizes = group_by_slot(jnp.repeat(slots, seq), a.shape[0])
        h = sgmv_shrink(xt, a4, order, group_sizes, interpret=interpret)
    h = _join_rank(h.reshape(tokens, -1), layout).astype(b.dtype).reshape(tokens, b4.shape[1], b4.shape[2])

    def expand(target: jax.Array) -> jax.Array:
        blocks = target.reshape(tokens, b4.shape[1], b4.shape[3])
        if seq == 1:
            return bgmv_expand(h, b4, slots, blocks, interpret=interpret).reshape(target.shape)
        return sgmv_expand(h, b4, order, group_sizes, blocks, interpret=interpret).reshape(target.shape)

    yt = y.reshape(tokens, -1)
    if not into_slice:
        return expand(yt).reshape(y.shape)
    width = b4.shape[1] * b4.shape[3]
    offset = jax.lax.axis_index(MODEL) * width
    own = expand(jax.lax.dynamic_slice_in_dim(yt, offset, width, axis=1))
    return jax.lax.dynamic_update_slice_in_dim(yt, own, offset, axis=1).reshape(y.shape)


def _dropout_mask(key: jax.Array, rate: jax.Array, x: jax.Array, x_spec: PartitionSpec, mesh) -> jax.Array:
    """This device's slice of one global LoRA-dropout mask over x, so every mesh drops the same entries."""
    axes = tuple(x_spec) + (None,) * (x.ndim - len(x_spec))
    sizes = [mesh.shape[a] if a is not None else 1 for a in axes]
    keep = jax.random.bernoulli(key, 1.0 - rate, tuple(d * s for d, s in zip(x.shape, sizes)))
    starts = [jax.lax.axis_index(a) * d if a is not None else 0 for a, d in zip(axes, x.shape)]
    return jax.lax.dynamic_slice(keep, starts, x.shape)


def _into_slice(base_output: str, layout: LoraLayout) -> bool:
    """Whether an adapter's exact output slice goes into a row-parallel partial-sum buffer."""
    return base_output == PARTIAL and layout.output == SLICE


def _place_slice(y: jax.Array, n: int) -> jax.Array:
    """Put this device's exact output slice into a zero (…, n·width) partial-sum buffer at its offset."""
    width = y.shape[-1]
    buffer = jnp.zeros(y.shape[:-1] + (n * width,), y.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buffer, y, jax.lax.axis_index(MODEL) * width, axis=2)


def adapted_linear(
    x: jax.Array,
    w: jax.Array,
    lora: tuple[jax.Array, jax.Array] | None,
    slots: jax.Array | None,
    *,
    mesh: jax.sharding.Mesh,
    x_spec: PartitionSpec,
    w_spec: PartitionSpec,
    out_spec: PartitionSpec,
    factor_specs: tuple[PartitionSpec, PartitionSpec] | None,
    slot_spec: PartitionSpec,
    impl: str = "xla",
    dropout: tuple[jax.Array, jax.Array] | None = None,
    compressed: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    compressed_specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None = None,
    compressed_rows: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """x (batch, seq, d_in) · w (d_in, d_out) plus each row's adapter; row-parallel sums end in one psum.

    dropout = (key, rate) applies LoRA dropout to the adapter's input (training only; XLA path).
    compressed = (V, U, Σ) of a compressed bank with their specs, and compressed_rows = (cluster, Σ id) per row:
    a row may use a bank slot, a compressed adapter, both or neither.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if dropout is not None and impl != "xla":
        raise ValueError("LoRA dropout is a training feature of the xla implementation")
    row_parallel = w_spec[0] == MODEL if len(w_spec) else False
    base_output = PARTIAL if row_parallel else (SLICE if len(w_spec) > 1 and w_spec[1] == MODEL else FULL)
    n = mesh.shape[MODEL]

    if lora is None and compressed is None:
        def local(x, w):
            y = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
            return jax.lax.psum(y, MODEL) if row_parallel else y

        return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, w_spec), out_specs=out_spec)(x, w)

    def joined_layout(first: jax.Array, second: jax.Array, specs, what: str) -> LoraLayout:
        layout = LoraLayout.from_specs(specs[0], specs[1], first.ndim, second.ndim)
        if layout.output != base_output and not (base_output == PARTIAL and layout.output == SLICE):
            raise ValueError(f"{what} output {layout.output} cannot join a {base_output} base output ({w_spec})")
        return layout

    a, b = lora if lora is not None else (None, None)
    layout = joined_layout(a, b, factor_specs, "LoRA") if lora is not None else None
    c_layout = joined_layout(compressed[0], compressed[1], compressed_specs, "compressed bank") \
        if compressed is not None else None

    def local(x, w, slots, a, b, dropout, compressed, compressed_rows):
        y = jnp.dot(x, w, preferred_element_type=jnp.float32)
        if lora is not None and impl == "xla":
            x_lora = x
            if dropout is not None:
                key, rate = dropout
                keep = _dropout_mask(key, rate, x, x_spec, mesh)
                x_lora = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
            delta = _lora_delta(x_lora, slots, a, b, layout)
            y = y + (_place_slice(delta, n) if _into_slice(base_output, layout) else delta)
        elif lora is not None:
            y = _lora_pallas(x, y, slots, a, b, layout, _into_slice(base_output, layout),
                             interpret=impl == "pallas_interpret")
        if compressed is not None:
            delta = _compressed_delta(x, *compressed_rows, *compressed, c_layout)
            y = y + (_place_slice(delta, n) if _into_slice(base_output, c_layout) else delta)
        y = y.astype(x.dtype)
        return jax.lax.psum(y, MODEL) if row_parallel else y

    in_specs = (x_spec, w_spec,
                None if lora is None else slot_spec,
                None if lora is None else factor_specs[0],
                None if lora is None else factor_specs[1],
                None if dropout is None else (PartitionSpec(), PartitionSpec()),
                None if compressed is None else compressed_specs,
                None if compressed is None else (slot_spec, slot_spec))
    # A pallas_call's outputs carry no varying-axes type, so the kernels' shard_map skips that check (as JAX's own
    # Pallas GPU ops do); the specs above still say exactly what each device holds.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=impl == "xla")(
        x, w, slots, a, b, dropout, compressed, compressed_rows)
