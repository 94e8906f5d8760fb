"""The compressed-bank delta x·V[c]·Σ[id]ᵀ·U[c]: each cluster's shared bases multiply all its tokens in one grouped GEMM.

Tokens come in the routing's cluster order (tokens without a compressed adapter last, in no group, so
`lax.ragged_dot` gives them zeros); Σ is applied per token after the strategy's collective on x·V.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .routing import Routing


def _grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, block: bool) -> jax.Array:
    """x (tokens, d) sorted by group times each group's w (groups, d, k), or block-diagonal w (groups, nb, d/nb, k/nb)."""
    if not block:
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    xb = x.reshape(x.shape[0], w.shape[1], w.shape[2]).transpose(1, 0, 2)
    dims = jax.lax.RaggedDotDimensionNumbers((([2], [2]), ([0], [1])), lhs_ragged_dimensions=[1],
                                             rhs_group_dimensions=[0])
    y = jax.lax.ragged_dot_general(xb, w, group_sizes, dims, preferred_element_type=jnp.float32)
    return y.transpose(1, 0, 2).reshape(x.shape[0], -1)


def compressed_delta(x: jax.Array, v: jax.Array, u: jax.Array, sigma: jax.Array, routing: Routing, v_block: bool,
                     u_block: bool, join: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Per-device compressed contribution of every token (batch, seq, out) in float32 (Σ id 0: none)."""
    batch, seq = x.shape[:2]
    order, sizes = routing.cluster_order, routing.cluster_sizes
    h = join(_grouped(x.reshape(batch * seq, -1)[order], v, sizes, v_block))
    token_sigma = sigma[routing.token_sigma[order]]  # (T, nbΣ, r, r) in cluster order
    h = jnp.einsum("tnr,tnqr->tnq", h.reshape(h.shape[0], token_sigma.shape[1], token_sigma.shape[2]), token_sigma,
                   preferred_element_type=jnp.float32).reshape(h.shape[0], -1).astype(u.dtype)
    y = _grouped(h, u, sizes, u_block)
    return jnp.zeros_like(y).at[order].set(y).reshape(batch, seq, -1)
