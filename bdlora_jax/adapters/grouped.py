"""The XLA multi-adapter LoRA delta as a grouped GEMM: each routing tile multiplies its adapter's factors once.

Tokens are laid out in the routing's tiles (every tile holds tokens of one adapter group, padded with zero rows);
a loop over the tiles that hold tokens (the first `tiles_used`) multiplies each by its adapter's A and B, read in
place from the bank (no per-token or per-tile copy of the factors); a token without an adapter is in no tile and
gets zeros. Block-diagonal factors
(bdlora) contract block by block. A batch routed in blocks of rows (training) skips the tiles: each block's
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


def _varying(*arrays: jax.Array) -> frozenset:
    """The mesh axes any of `arrays` varies over under shard_map (none outside one)."""
    return frozenset().union(*(jax.typeof(v).manual_axis_type.varying for v in arrays))


def _each_tile(tiles: jax.Array, slots: jax.Array, used: jax.Array, step: Callable, factors: tuple) -> jax.Array:
    """step(slot, tile) over the first `used` tiles (the ones holding tokens; the empty rest stay zero), one tile at
    a time: each reads its adapter's factors (from `factors`) in place (a dynamic index into the bank), where a
    batched matmul would first copy every tile's factors. Tiles go in rounds of UNROLL consecutive tiles, each
    round's results written at once, which measured fastest on CPU (fewer loop steps and writes); a round that
    would pass the last tile starts earlier instead, writing again what an earlier round wrote."""
    count = slots.shape[0]
    if count == 1:  # one adapter's tokens in one tile: no loop
        return step(slots[0], tiles[0])[None]
    unroll = UNROLL if count > 2 * UNROLL else 1  # many small tiles (decode): unrolled; few: compiles less
    result = jax.eval_shape(step, slots[0], tiles[0])

    def one_round(i, out):
        first = jnp.minimum(i * unroll, count - unroll)
        round_tiles = jax.lax.dynamic_slice_in_dim(tiles, first, unroll)
        round_slots = jax.lax.dynamic_slice_in_dim(slots, first, unroll)
        ys = jnp.stack([step(round_slots[j], round_tiles[j]) for j in range(unroll)])
        return jax.lax.dynamic_update_slice_in_dim(out, ys, first, 0)

    zeros = jnp.zeros((count, *result.shape), result.dtype)
    axes = _varying(tiles, *factors)
    if axes:  # under shard_map the loop's carry varies over the mesh axes its results do
        zeros = jax.lax.pcast(zeros, tuple(axes), to="varying")
    return jax.lax.fori_loop(0, (used + unroll - 1) // unroll, one_round, zeros)


def grouped_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, routing: Routing, a_block: bool, b_block: bool,
                       join: Callable[[jax.Array], jax.Array], collective: bool) -> jax.Array:
    """Per-device x·A[slot]·B[slot] of every token (batch, seq, out) in float32; join is the strategy's collective
    on the rank-sized x·A (collective: it moves data, so it runs on the tokens rather than on padded tiles, between
    a shrink pass and an expand pass; without one, each tile's shrink and expand run in one pass)."""
    batch, seq = x.shape[:2]
    tiles = to_tiles(x.reshape(batch * seq, -1), routing)

    def factor(bank: jax.Array, slot: jax.Array) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(bank, slot, 0, keepdims=False)

    def shrink(slot, tile):
        return _contract(tile, factor(a, slot), a_block)

    def expand(slot, h):
        return _contract(h.astype(b.dtype), factor(b, slot), b_block)

    used = routing.tiles_used[0]
    if collective:
        h = to_tiles(join(from_tiles(_each_tile(tiles, routing.tile_slots, used, shrink, (a,)), routing)), routing)
        y = _each_tile(h, routing.tile_slots, used, expand, (b,))
    else:
        y = _each_tile(tiles, routing.tile_slots, used, lambda slot, tile: expand(slot, shrink(slot, tile)), (a, b))
    return from_tiles(y, routing).reshape(batch, seq, -1)


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
    axes = _varying(x, w)
    x, w = (jax.lax.pcast(v, tuple(axes - _varying(v)), to="varying") if axes - _varying(v) else v for v in (x, w))
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
