"""Logit adjustments before sampling, in vLLM's order: sparse per-row additions (logit_bias, and -inf on the stop
tokens a row may not yet produce under min_tokens), then the repetition, frequency and presence penalties.

The penalties read a per-row state kept on the device by the generator: `seen` (rows, vocab) bool, the tokens of each
row's prompt, and `counts` (rows, vocab) int32, how often each token was generated so far. Rows with bias 0 and
neutral penalties (1, 0, 0) come out bit for bit unchanged, so one adjusted call serves a mixed batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def add_sparse(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """logits (rows, vocab) plus values (rows, width) at token ids (rows, width); padding entries add 0 at id 0."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, ids].add(values)


def apply_penalties(logits: jax.Array, seen: jax.Array, counts: jax.Array, penalties: jax.Array) -> jax.Array:
    """vLLM's penalties: repetition (divide a positive logit, multiply a negative one, of every token in the prompt
    or output), then frequency (minus penalty x times generated), then presence (minus penalty if generated once).

    penalties (3, rows) float32: repetition, frequency, presence.
    """
    repetition, frequency, presence = penalties[0][:, None], penalties[1][:, None], penalties[2][:, None]
    generated = counts > 0
    factor = jnp.where(seen | generated, repetition, 1.0)
    logits = jnp.where(logits > 0, logits / factor, logits * factor)
    return logits - frequency * counts - presence * generated


def adjust(logits: jax.Array, ids: jax.Array, values: jax.Array, seen: jax.Array, counts: jax.Array,
           penalties: jax.Array) -> jax.Array:
    """The logits a row samples from: sparse additions first, then the penalties (as vLLM orders them)."""
    return apply_penalties(add_sparse(logits, ids, values), seen, counts, penalties)


def history(seen: jax.Array, counts: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (seen, counts) of decode rows `rows` (a row index past the end reads as an empty history)."""
    return seen.at[rows].get(mode="fill", fill_value=False), counts.at[rows].get(mode="fill", fill_value=0)


def reset_rows(seen: jax.Array, counts: jax.Array, rows: jax.Array, prompt_seen: jax.Array,
               generated: jax.Array | None = None):
    """Start the history of newly admitted rows: their prompt's tokens seen, and nothing generated, or `generated`
    (rows, vocab) counts for a request that resumes with tokens already out (rows past the end: skipped)."""
    return seen.at[rows].set(prompt_seen, mode="drop"), counts.at[rows].set(0 if generated is None else generated,
                                                                             mode="drop")


def record_tokens(counts: jax.Array, rows: jax.Array, tokens: jax.Array) -> jax.Array:
    """Count one more generation of each row's new token (rows past the end: skipped)."""
    return counts.at[rows, tokens].add(1, mode="drop")


reset_rows_jit = jax.jit(reset_rows, donate_argnums=(0, 1))
record_tokens_jit = jax.jit(record_tokens, donate_argnums=(0,))


def prompt_mask(prompts: list[list[int]], rows: int, vocab: int) -> np.ndarray:
    """(rows, vocab) bool: which tokens each prompt holds (rows past the prompts: none)."""
    mask = np.zeros((rows, vocab), bool)
    for i, prompt in enumerate(prompts):
        mask[i, prompt] = True
    return mask
