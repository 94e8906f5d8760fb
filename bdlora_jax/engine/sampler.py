"""Per-row token sampling (greedy, temperature, top-k, top-p) in one jitted call, so a decode batch mixes requests."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..errors import InvalidRequestError

MAX_TOKENS_LIMIT = 1_000_000
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 is greedy, top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequestError for the first field outside its range (its `field` names it)."""
        if not self.temperature >= 0:
            raise InvalidRequestError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= vocab_size:
            raise InvalidRequestError("top_k", f"top_k must be in [0, {vocab_size}] (0 = off), got {self.top_k}")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidRequestError("max_tokens",
                                      f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError("seed", f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError("stop_token_ids", f"stop_token_ids must be in [0, {vocab_size}), got {bad}")


def _top_k_keep(vocab: int, top_k: jax.Array) -> jax.Array:
    """Mask over descending-sorted positions keeping exactly the first k (all of them where k is 0)."""
    k = jnp.where(top_k > 0, top_k, vocab)
    return jnp.arange(vocab)[None, :] < k[:, None]


def _top_p_keep(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask over descending-sorted positions keeping the smallest prefix whose probability reaches top_p.

    The first position has nothing before it, so it is kept for any top_p > 0; top_p >= 1 keeps everything even where
    the float32 running sum reaches 1 before the tail.
    """
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    return (before < top_p[:, None]) | (top_p[:, None] >= 1)


@jax.jit
def sample(
    logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array, keys: jax.Array
) -> jax.Array:
    """Next token per row: argmax where temperature is 0, else a draw after temperature, top-k then top-p.

    logits (rows, vocab); temperature, top_p float32 (rows,); top_k int32 (rows,); keys (rows, 2) uint32 key data.
    Returns int32 (rows,).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    order = jnp.argsort(logits, axis=-1, descending=True, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    # shift so the maximum is 0 before dividing: tiny temperatures then give -inf, never +inf or nan
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = (sorted_logits - sorted_logits[:, :1]) / t
    scaled = jnp.where(_top_k_keep(vocab, top_k), scaled, -jnp.inf)
    scaled = jnp.where(_top_p_keep(scaled, top_p), scaled, -jnp.inf)
    position = jax.vmap(jax.random.categorical)(jax.random.wrap_key_data(keys), scaled)
    drawn = jnp.take_along_axis(order, position[:, None], axis=-1)[:, 0]
    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(temperature == 0, greedy, drawn).astype(jnp.int32)


@jax.jit
def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Key data (rows, 2) uint32 from each row's seed and step, independent of the row's place in the batch."""
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, steps)
    return jax.random.key_data(keys)
