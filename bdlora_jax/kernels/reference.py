"""Pure-jnp multi-adapter shrink and expand: the semantics the Pallas kernels are tested against.

Layouts (T tokens, S slots, nb = blocks of a block-diagonal factor on this device, 1 for a dense factor):
shrink: x (T, nb, d_in), A (S, nb, d_in, r), slots (T,) -> h (T, nb, r) float32, h[t] = x[t]·A[slots[t]];
expand: h (T, nb, r), B (S, nb, r, d_out), slots (T,), y (T, nb, d_out) float32 -> y + h·B[slots].
Products accumulate in float32 whatever the input dtype, as on the model's XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shrink(x: jax.Array, a: jax.Array, slots: jax.Array) -> jax.Array:
    """x·A[slot] for every token, by gathering each token's factor (T copies of (nb, d_in, r))."""
    return jnp.einsum("tnd,tndr->tnr", x, a[slots], preferred_element_type=jnp.float32)


def expand(h: jax.Array, b: jax.Array, slots: jax.Array, y: jax.Array) -> jax.Array:
    """y + h·B[slot] for every token, by gathering each token's factor (T copies of (nb, r, d_out))."""
    return y + jnp.einsum("tnr,tnro->tno", h, b[slots], preferred_element_type=jnp.float32)
