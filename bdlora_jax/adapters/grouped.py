"""The XLA multi-adapter LoRA delta as a grouped GEMM: each routing tile multiplies its adapter's factors once.

Tokens are laid out in the routing's tiles (every tile holds tokens of one adapter group, padded with zero rows);
a loop over tiles multiplies each tile by its adapter's A and B, read in place from the bank (no per-token or
per-tile copy of the factors); a token without an adapter is in no tile and gets zeros. Block-diagonal factors
(bdlora) contract block by block.
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
    tb = t.reshape(t.shape[0], factor.shape[0], factor.shape[1])
    return jnp.einsum("qbk,bkr->qbr", tb, factor, preferred_element_type=jnp.float32).reshape(t.shape[0], -1)


def _each_tile(tiles: jax.Array, slots: jax.Array, step: Callable) -> jax.Array:
    """step(slot, tile) over every tile, one tile at a time: each reads its adapter's factors in place (a dynamic
    index into the bank), where a batched matmul would first copy every tile's factors. Unrolled by UNROLL,
    which measured fastest on CPU (fewer loop steps, no code blow-up)."""
    unroll = UNROLL if slots.shape[0] > 2 * UNROLL else 1  # many small tiles (decode): unrolled; few: compiles less
    return jax.lax.scan(lambda carry, item: (carry, step(*item)), None, (slots, tiles), unroll=unroll)[1]


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

    if collective:
        h = to_tiles(join(from_tiles(_each_tile(tiles, routing.tile_slots, shrink), routing)), routing)
        y = _each_tile(h, routing.tile_slots, expand)
    else:
        y = _each_tile(tiles, routing.tile_slots, lambda slot, tile: expand(slot, shrink(slot, tile)))
    return from_tiles(y, routing).reshape(batch, seq, -1)
