"""The XLA multi-adapter LoRA delta as a grouped GEMM: each routing tile multiplies its adapter's factors once.

Tokens are laid out in the routing's tiles (every tile holds tokens of one adapter group, padded with zero rows);
a loop over tiles multiplies each tile by its adapter's A and B, taken from the bank by a dynamic index, one
tile's factors at a time (never an array of every token's or every tile's factors); a token without an adapter
is in no tile and gets zeros. Block-diagonal factors (bdlora) contract block by block. Few tokens over few groups
(routing.group_slots set) skip the tiles: two products multiply every token by every group's factors, and a mask
keeps each token's own group. A batch routed in blocks of rows (training) skips the tiles too: each block's
tokens are contiguous already, so one batched matmul multiplies every block by a copy of its adapter's factors.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .routing import Routing

UNROLL = 8


def to_tiles(x: jax.Array, routing: Routing) -> jax.Array:
    """(T, d) tokens as (tiles, tile, d) in the routing's tile layout; empty positions are zero rows."""
    padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    return padded[routing.tile_tokens].reshape(routing.tile_slots.shape[0], routing.tile, x.shape[1])


def from_tiles(y: jax.Array, routing: Routing) -> jax.Array:
    """(tiles, tile, d) back to (T, d) token order; tokens in no tile get zeros."""
    flat = y.reshape(-1, y.shape[-1])
    return jnp.concatenate([flat, jnp.zeros((1, flat.shape[1]), flat.dtype)])[routing.token_places]


def _contract(t: jax.Array, factor: jax.Array, block: bool) -> jax.Array:
    """One tile (tile, k) times its factor (k, n), or block-diagonal factor (nb, k/nb, n/nb), in float32."""
    if not block:
        return jnp.dot(t, factor, preferred_element_type=jnp.float32)
    if factor.shape[0] == 1:  # one block on this device (bdlora's own shard): a dense factor (XLA's CPU backend
        return jnp.dot(t, factor[0], preferred_element_type=jnp.float32)  # transposes it for a 1-block einsum)
    tb = t.reshape(t.shape[0], factor.shape[0], factor.shape[1])
    return jnp.einsum("qbk,bkr->qbr", tb, factor, preferred_element_type=jnp.float32).reshape(t.shape[0], -1)


def _each_tile(tiles: jax.Array, slots: jax.Array, step: Callable) -> jax.Array:
    """step(slot, tile) over every tile, one tile at a time: each takes its adapter's factors by a dynamic index
    into the bank, where a batched matmul would first gather every tile's factors into one array. (XLA's CPU
    backend still copies each tile's slice into a small buffer for its dot, which stays in cache.) Unrolled by
    UNROLL, which measured fastest on CPU (fewer loop steps, no code blow-up)."""
    unroll = UNROLL if slots.shape[0] > 2 * UNROLL else 1  # many small tiles (decode): unrolled; few: compiles less
    return jax.lax.scan(lambda carry, item: (carry, step(*item)), None, (slots, tiles), unroll=unroll)[1]


def grouped_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, routing: Routing, a_block: bool, b_block: bool,
                       join: Callable[[jax.Array], jax.Array], collective: bool) -> jax.Array:
    """Per-device x·A[slot]·B[slot] of every token (batch, seq, out) in float32; join is the strategy's collective
    on the rank-sized x·A (collective: it moves data, so it runs on the tokens rather than on padded tiles, between
    a shrink pass and an expand pass; without one, each tile's shrink and expand run in one pass)."""
    batch, seq = x.shape[:2]
    if routing.group_slots is not None:
        return _every_group_delta(x.reshape(batch * seq, -1), a, b, routing, a_block, b_block, join).reshape(
            batch, seq, -1)
    tiles = to_tiles(x.reshape(batch * seq, -1), routing)

    def factor(bank: jax.Array, slot: jax.Array) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(bank, slot, 0, keepdims=False)

    def shrink(slot, tile):
        return _contract(tile, factor(a, slot), a_block)

    def expand(slot, h):
        return _contract(h.astype(b.dtype), factor(b, slot), b_block)

    if collective:
        h = to_tiles(join(from_tiles(_each_tile(tiles, routing.tile_slots, shrink), routing)), routing)
        y = _each_tile(h, routing.tile_slots, expand)
    else:
        y = _each_tile(tiles, routing.tile_slots, lambda slot, tile: expand(slot, shrink(slot, tile)))
    return from_tiles(y, routing).reshape(batch, seq, -1)


def _every_group_delta(x: jax.Array, a: jax.Array, b: jax.Array, routing: Routing, a_block: bool, b_block: bool,
                       join: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """x·A[slot]·B[slot] of every token (T, out) in float32 from the products of every token with every group's
    factors (one copy of each group's A and B), masked to each token's own group; zeros for a token in no group."""
    mask = routing.token_groups  # (T, groups)
    fa, fb = a[routing.group_slots], b[routing.group_slots]
    if a_block and fa.shape[1] > 1:
        xb = x.reshape(x.shape[0], fa.shape[1], fa.shape[2])
        h = jnp.einsum("tbk,gbkr->tgbr", xb, fa, preferred_element_type=jnp.float32).reshape(mask.shape + (-1,))
    else:
        h = jnp.einsum("tk,gkr->tgr", x, fa[:, 0] if a_block else fa, preferred_element_type=jnp.float32)
    h = join(jnp.einsum("tgr,tg->tr", h, mask))
    own = (h[:, None, :] * mask[:, :, None]).astype(b.dtype)  # (T, groups, rank): zero outside the token's group
    if b_block and fb.shape[1] > 1:
        ob = own.reshape(own.shape[:2] + fb.shape[1:3])
        return jnp.einsum("tgbr,gbrn->tbn", ob, fb, preferred_element_type=jnp.float32).reshape(x.shape[0], -1)
    return jnp.einsum("tgr,grn->tn", own, fb[:, 0] if b_block else fb, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _group_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(groups, tokens, k) · (groups, k, n) -> (groups, tokens, n) in float32, one matrix per group.

    Its backward pass computes the weight gradient as (narrow operand)ᵀ · (wide operand), so that only the
    rank-sized side is ever transposed: autodiff's xᵀ·dy would transpose the wide activations (on CPU, a copy
    fused into the elementwise backward that costs as much as the layer's matmul)."""
    return jnp.einsum("gtk,gkn->gtn", x, w, preferred_element_type=jnp.float32)


def _group_matmul_fwd(x, w):
    """The forward pass, keeping both operands for the backward."""
    return _group_matmul(x, w), (x, w)


def _group_matmul_bwd(residuals, dy):
    """(dx, dw): dw as (narrow operand)ᵀ · (wide operand), transposed afterwards when x is the wide one."""
    x, w = residuals
    dx = jnp.einsum("gtn,gkn->gtk", dy, w, preferred_element_type=jnp.float32).astype(x.dtype)
    if x.shape[-1] <= dy.shape[-1]:
        dw = jnp.einsum("gtk,gtn->gkn", x, dy, preferred_element_type=jnp.float32)
    else:
        # Barriers keep dyᵀ a (small) array of its own and the product in (narrow, wide) order; XLA would fold both
        # transposes into one dot contracting the token axis of both operands, which runs 2.6x slower on CPU.
        dy_t = jax.lax.optimization_barrier(jnp.swapaxes(dy, 1, 2))
        dw_t = jax.lax.optimization_barrier(jnp.einsum("gnt,gtk->gnk", dy_t, x, preferred_element_type=jnp.float32))
        dw = jnp.swapaxes(dw_t, 1, 2)
    return dx, dw.astype(w.dtype)


_group_matmul.defvjp(_group_matmul_fwd, _group_matmul_bwd)


def _group_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """_group_matmul of operands made to vary over the same mesh axes (under shard_map), as autodiff's own dot
    would: the cotangent of an operand that varies over fewer axes is then summed over the others."""
    def varying(v):
        """The mesh axes v varies over under shard_map (none outside one)."""
        return jax.typeof(v).manual_axis_type.varying

    axes = varying(x) | varying(w)
    x, w = (jax.lax.pcast(v, tuple(axes - varying(v)), to="varying") if axes - varying(v) else v for v in (x, w))
    return _group_matmul(x, w)


def _contract_blocks(x: jax.Array, factors: jax.Array, block: bool) -> jax.Array:
    """(groups, tokens, k) times one factor per group (groups, k, n), or block-diagonal (groups, nb, k/nb, n/nb)."""
    if not block:
        return _group_product(x, factors)
    if factors.shape[1] == 1:  # one block on this device (bdlora's own shard): a dense factor
        return _group_product(x, factors[:, 0])
    xb = x.reshape(x.shape[:2] + factors.shape[1:3])
    y = jnp.einsum("gtbk,gbkn->gtbn", xb, factors, preferred_element_type=jnp.float32)
    return y.reshape(x.shape[:2] + (-1,))


def block_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, block_slots: jax.Array, a_block: bool, b_block: bool,
                     join: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Per-device x·A[slot]·B[slot] (batch, seq, out) in float32 for rows in equal blocks, block i on bank slot
    block_slots[i]; join is the strategy's collective on the rank-sized x·A."""
    batch, seq, width = x.shape
    blocks = block_slots.shape[0]
    h = join(_contract_blocks(x.reshape(blocks, batch // blocks * seq, width), a[block_slots], a_block))
    return _contract_blocks(h.astype(b.dtype), b[block_slots], b_block).reshape(batch, seq, -1)
