"""Token cross-entropy from the final hidden states and the LM head, whole or in chunks of tokens.

Chunked, the [tokens, vocab] logits never exist at once: a loop over chunks of tokens applies the head and the
softmax to one chunk at a time, and the backward pass recomputes each chunk's logits instead of keeping them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _chunk_losses(head: jax.Array, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of each of `hidden`'s (..., hidden) tokens against `targets`, logits in float32."""
    logits = jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def token_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int = 0) -> jax.Array:
    """Each token's cross-entropy (rows, seq) from hidden (rows, seq, hidden) and head (hidden, vocab);
    chunk_tokens > 0 computes it `chunk_tokens` tokens at a time (rematerialised in the backward pass)."""
    if chunk_tokens <= 0:
        return _chunk_losses(head, hidden, targets)
    rows, seq, width = hidden.shape
    count = rows * seq
    fill = -count % chunk_tokens
    flat_hidden = jnp.pad(hidden.reshape(count, width), ((0, fill), (0, 0))).reshape(-1, chunk_tokens, width)
    flat_targets = jnp.pad(targets.reshape(count), (0, fill)).reshape(-1, chunk_tokens)
    one_chunk = jax.checkpoint(lambda pair: _chunk_losses(head, *pair))
    losses = jax.lax.map(one_chunk, (flat_hidden, flat_targets))
    return losses.reshape(-1)[:count].reshape(rows, seq)
