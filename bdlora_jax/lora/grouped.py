"""The XLA multi-adapter LoRA delta as a grouped GEMM: each routing tile multiplies one copy of its adapter's factors.

Tokens are laid out in the routing's tiles (every tile holds tokens of one adapter group, padded with zero rows),
each tile's A and B are gathered once, and the shrink and expand are batched matmuls over tiles; a token without
an adapter is in no tile and gets zeros. Block-diagonal factors (bdlora) contract block by block.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .routing import Routing


def to_tiles(x: jax.Array, routing: Routing) -> jax.Array:
    """(T, d) tokens as (tiles, tile, d) in the routing's tile layout; empty positions are zero rows."""
    padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    return padded[routing.tile_tokens].reshape(routing.tile_slots.shape[0], routing.tile, x.shape[1])


def from_tiles(y: jax.Array, routing: Routing) -> jax.Array:
    """(tiles, tile, d) back to (T, d) token order; tokens in no tile get zeros."""
    flat = y.reshape(-1, y.shape[-1])
    return jnp.concatenate([flat, jnp.zeros((1, flat.shape[1]), flat.dtype)])[routing.token_places]


def _contract(t: jax.Array, factor: jax.Array, block: bool) -> jax.Array:
    """(tiles, tile, k) times each tile's factor (tiles, k, n) or block-diagonal (tiles, nb, k/nb, n/nb), in float32."""
    if not block:
        return jnp.einsum("nqk,nkr->nqr", t, factor, preferred_element_type=jnp.float32)
    tiles, tile = t.shape[:2]
    tb = t.reshape(tiles, tile, factor.shape[1], factor.shape[2])
    y = jnp.einsum("nqbk,nbkr->nqbr", tb, factor, preferred_element_type=jnp.float32)
    return y.reshape(tiles, tile, -1)


def grouped_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, routing: Routing, a_block: bool, b_block: bool,
                       join: Callable[[jax.Array], jax.Array], collective: bool) -> jax.Array:
    """Per-device x·A[slot]·B[slot] of every token (batch, seq, out) in float32; join is the strategy's collective
    on the rank-sized x·A (collective: it moves data, so it runs on the tokens rather than on padded tiles)."""
    batch, seq = x.shape[:2]
    tiles = to_tiles(x.reshape(batch * seq, -1), routing)
    h = _contract(tiles, a[routing.tile_slots], a_block)
    if collective:
        h = to_tiles(join(from_tiles(h, routing)), routing)
    h = h.astype(b.dtype)
    y = _contract(h, b[routing.tile_slots], b_block)
    return from_tiles(y, routing).reshape(batch, seq, -1)
