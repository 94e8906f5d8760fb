"""Log-probabilities of generated tokens, as vLLM returns them by default ("raw_logprobs"): log_softmax of the
model's own logits, before logit_bias, penalties, temperature and the top-k / top-p filters."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .sampler import top_candidates


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the `logprobs` most likely tokens at its position (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(raw: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen token's log-probability (rows,), top-k log-probabilities (rows, k), their token ids (rows, k)) from
    float32 logits (rows, vocab); ties resolve to the lower token id, as lax.top_k."""
    logp = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=1)[:, 0]
    values, ids = top_candidates(logp, k)
    return chosen, values, ids


def row_logprob(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], index: int, token: int, n: int) -> TokenLogprob:
    """The TokenLogprob of row `index` of token_logprobs' host arrays, keeping the n most likely tokens."""
    chosen, values, ids = arrays
    top = tuple((int(t), float(v)) for t, v in zip(ids[index, :n], values[index, :n]))
    return TokenLogprob(int(token), float(chosen[index]), top)
