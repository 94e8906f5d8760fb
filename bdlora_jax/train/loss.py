"""Token cross-entropy from the final hidden states and the LM head, whole or in chunks of tokens.

Chunked, the [tokens, vocab] logits never exist at once, and the LM head runs twice per token, as it does whole:
a loop over chunks of tokens computes each chunk's losses and, in the same pass, each token's gradient with respect
to its hidden state, (softmax - one_hot(target)) @ headᵀ. A token's loss is a function of its own hidden state, so
the backward pass only scales those gradients by the tokens' cotangents; recomputing the logits there instead
would run the head a third time. (A gradient for the head itself, which training keeps frozen, is recomputed in
the backward pass only when asked for.)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax


def _logits(head: jax.Array, hidden: jax.Array) -> jax.Array:
    """Float32 logits (..., vocab) of hidden (..., hidden) under head (hidden, vocab)."""
    return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)


def _chunk_losses(head: jax.Array, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of each of `hidden`'s (..., hidden) tokens against `targets`, logits in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(_logits(head, hidden), targets)


def _logit_grads(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each token's loss (tokens,) and the loss's gradient with respect to its logits, softmax - one_hot
    (exp(logits - max) is computed once and normalised: fewer passes over the chunk's logits than log-softmax)."""
    peak = logits.max(axis=-1, keepdims=True)
    exps = jnp.exp(logits - peak)
    total = exps.sum(axis=-1, keepdims=True)
    losses = (peak + jnp.log(total) - jnp.take_along_axis(logits, targets[:, None], axis=-1))[:, 0]
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, 1)
    return losses, exps / total - (vocab == targets[:, None]).astype(jnp.float32)


def _chunk_losses_and_hidden_grads(head: jax.Array, hidden: jax.Array, targets: jax.Array):
    """One chunk's (tokens,) losses and each loss's gradient with respect to its token's hidden state."""
    losses, logit_grads = _logit_grads(_logits(head, hidden), targets)
    grads = jnp.einsum("tv,dv->td", logit_grads, head, preferred_element_type=jnp.float32)
    return losses, grads.astype(hidden.dtype)


def _chunks(x: jax.Array, chunk_tokens: int) -> jax.Array:
    """x (rows, seq, ...) as (chunks, chunk_tokens, ...), tokens in row order, the last chunk padded with zeros."""
    flat = x.reshape((-1,) + x.shape[2:])
    fill = -flat.shape[0] % chunk_tokens
    return jnp.pad(flat, ((0, fill),) + ((0, 0),) * (flat.ndim - 1)).reshape((-1, chunk_tokens) + x.shape[2:])


def _unchunk(values: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(chunks, chunk_tokens, ...) values back to shape (rows, seq, ...), the padding dropped."""
    count = shape[0] * shape[1]
    return values.reshape(-1, *values.shape[2:])[:count].reshape(shape + values.shape[2:])


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int) -> jax.Array:
    """Each token's cross-entropy (rows, seq), `chunk_tokens` tokens at a time."""
    losses = jax.lax.map(lambda pair: _chunk_losses(head, *pair), (_chunks(hidden, chunk_tokens),
                                                                   _chunks(targets, chunk_tokens)))
    return _unchunk(losses, targets.shape)


def _chunked_cross_entropy_fwd(hidden, head, targets, chunk_tokens):
    """The losses, and each token's hidden-state gradient kept for the backward pass (with the chunks, for the
    head's gradient)."""
    flat_hidden, flat_targets = _chunks(hidden, chunk_tokens), _chunks(targets, chunk_tokens)
    losses, grads = jax.lax.map(lambda pair: _chunk_losses_and_hidden_grads(head, *pair), (flat_hidden, flat_targets))
    return _unchunk(losses, targets.shape), (flat_hidden, head, flat_targets, _unchunk(grads, targets.shape))


def _chunked_cross_entropy_bwd(chunk_tokens, residuals, cotangent):
    """Hidden states' cotangents from the kept gradients; the head's from recomputed logits, chunk by chunk."""
    flat_hidden, head, flat_targets, grads = residuals
    flat_cotangent = _chunks(cotangent[..., None], chunk_tokens)

    def head_grad(total, chunk):
        x, t, g = chunk
        _, logit_grads = _logit_grads(_logits(head, x), t)
        return total + jnp.einsum("td,tv->dv", x * g, logit_grads, preferred_element_type=jnp.float32), None

    head_cotangent, _ = jax.lax.scan(head_grad, jnp.zeros(head.shape, jnp.float32),
                                     (flat_hidden, flat_targets, flat_cotangent))
    hidden_cotangent = (cotangent[..., None] * grads).astype(grads.dtype)
    return hidden_cotangent, head_cotangent.astype(head.dtype), None


_chunked_cross_entropy.defvjp(_chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd)


def token_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int = 0) -> jax.Array:
    """Each token's cross-entropy (rows, seq) from hidden (rows, seq, hidden) and head (hidden, vocab);
    chunk_tokens > 0 computes it `chunk_tokens` tokens at a time, with the hidden states' gradients."""
    if chunk_tokens <= 0:
        return _chunk_losses(head, hidden, targets)
    return _chunked_cross_entropy(hidden, head, targets, chunk_tokens)
