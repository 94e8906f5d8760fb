"""Per-row token sampling (greedy, temperature, top-k, top-p) in one jitted call, sorting only rows whose filters need it.

A decode batch mixes requests. A batch whose rows are all greedy costs one argmax, and one where at most half the
rows sample draws them a few rows at a time, grouped by path, so it pays for its sampling rows only. A sampling row
draws by inverse CDF with one uniform from its own key, over the smallest set that is exact for its filters: the
CANDIDATES largest tokens (found chunk-wise) when top-k or the top-p nucleus fits in them, the whole vocabulary when
no filter is set, and the vocabulary sorted (one row at a time) otherwise. The path depends on the row alone, so a
seeded request draws alike in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ..errors import InvalidRequestError

MAX_TOKENS_LIMIT = 1_000_000
MAX_SEED = 2**31 - 1
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_BIAS = 100.0  # each bias lies in [-MAX_BIAS, MAX_BIAS]
MAX_MIN_TOKENS_STOP_IDS = 300  # stop_token_ids a row under min_tokens can have banned at once
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on `logprobs` for completions


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 is greedy, top_k 0 and top_p 1 switch those filters off.

    logit_bias: (token id, bias) pairs added to the logits; the penalties' neutral values are 1 (repetition) and 0
    (presence, frequency); logprobs: None, or how many most likely tokens to report with each token's log-probability;
    ignore_eos: go on past the model's EOS; min_tokens: no EOS, stop token or stop string before that many tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether a bias or a penalty changes this request's logits at every step."""
        return bool(self.logit_bias) or (self.presence_penalty, self.frequency_penalty,
                                         self.repetition_penalty) != (0.0, 0.0, 1.0)

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequestError for the first field outside its range (its `field` names it)."""
        if not self.temperature >= 0:
            raise InvalidRequestError("temperature", f"temperature must be >= 0, got {self.temperature}")
        float32_max = float(jnp.finfo(jnp.float32).max)  # the device divides in float32: a larger one overflows
        if self.temperature > float32_max:
            raise InvalidRequestError("temperature", f"temperature must be finite in float32 (at most "
                                                     f"{float32_max:.4g}), got {self.temperature}")
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
        self._validate_logit_bias(vocab_size)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequestError(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0 or self.repetition_penalty == float("inf"):
            raise InvalidRequestError("repetition_penalty",
                                      f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("logprobs", f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                                    f"got {self.min_tokens}")
        if self.min_tokens and len(set(self.stop_token_ids)) > MAX_MIN_TOKENS_STOP_IDS:
            raise InvalidRequestError("stop_token_ids", f"with min_tokens, at most {MAX_MIN_TOKENS_STOP_IDS} "
                                                        f"stop_token_ids, got {len(set(self.stop_token_ids))}")

    def _validate_logit_bias(self, vocab_size: int) -> None:
        """logit_bias: at most MAX_LOGIT_BIAS entries, token ids in the vocabulary, biases in [-100, 100]."""
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, "
                                                    f"got {len(self.logit_bias)}")
        bad = [t for t, _ in self.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError("logit_bias", f"logit_bias token ids must be in [0, {vocab_size}), got {bad}")
        bad = [b for _, b in self.logit_bias if not -MAX_BIAS <= b <= MAX_BIAS]
        if bad:
            raise InvalidRequestError("logit_bias", f"logit_bias values must be in [-100, 100], got {bad}")
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise InvalidRequestError("logit_bias", "logit_bias names a token id more than once")


CANDIDATES = 64  # tokens a top-k / top-p row draws from without touching the rest of the vocabulary
CHUNK = 64  # vocabulary entries per chunk when finding candidates and drawing over the whole vocabulary
# rows drawn together when few rows sample: smaller blocks skip more greedy rows, larger ones repeat _draw's
# per-call costs less often (4 measured best on CPU for one to half of 32 rows)
DRAW_ROWS = 4


def _top_k_keep(vocab: int, top_k: jax.Array) -> jax.Array:
    """Mask over descending-sorted positions keeping exactly the first k (all of them where k is 0)."""
    k = jnp.where(top_k > 0, top_k, vocab)
    return jnp.arange(vocab)[None, :] < k[:, None]


def _top_p_count(ordered_weights: jax.Array, top_p: jax.Array) -> jax.Array:
    """How many leading entries of descending weights top-p keeps: the smallest prefix whose mass reaches top_p of the
    total, so the first entry always; every entry at top_p >= 1, even where the float32 running sum reaches the total
    before the tail."""
    return jnp.where(top_p < 1, _inverse_cdf_chunked(ordered_weights, top_p, reach=True) + 1,
                     ordered_weights.shape[-1])


def first_argmax(x: jax.Array) -> jax.Array:
    """Index of each row's maximum, the lowest on ties (as argmax), reading the vocabulary once."""
    chunks = _chunked(x, -jnp.inf)
    # materialised: XLA would otherwise fold the row maximum taken from it into a second pass over the vocabulary
    return _first_argmax(chunks, jax.lax.optimization_barrier(jnp.max(chunks, axis=-1)))


def _first_argmax(chunks: jax.Array, chunk_max: jax.Array) -> jax.Array:
    """first_argmax from the chunks and their maxima: the first chunk holding the row's maximum, then the position
    within that chunk."""
    top = jnp.max(chunk_max, axis=-1, keepdims=True)
    chunk = jnp.min(jnp.where(chunk_max == top, jnp.arange(chunk_max.shape[-1]), chunk_max.shape[-1]), axis=-1)
    within = jnp.take_along_axis(chunks, chunk[:, None, None], axis=1)[:, 0]
    position = jnp.min(jnp.where(within == top, jnp.arange(CHUNK), CHUNK), axis=-1)
    return (chunk * CHUNK + position).astype(jnp.int32)


def _chunked(x: jax.Array, fill: float) -> jax.Array:
    """(rows, vocab) as (rows, chunks, CHUNK), the tail padded with `fill`."""
    pad = (-x.shape[-1]) % CHUNK
    return jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill).reshape(x.shape[0], -1, CHUNK)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k with its result materialised: XLA's CPU backend runs its TopK kernel only where the sort it is
    expanded to stays next to its slice, and a consumer fused into that slice would leave a full sort."""
    values, index = jax.lax.top_k(x, k)
    return jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(index)


def _identity(x: jax.Array) -> jax.Array:
    """top_candidates' default map: the logits as they are."""
    return x


def top_candidates(x: jax.Array, k: int, monotone=_identity, chunk_max: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """Exact lax.top_k(monotone(x), k) (values descending, lower index first on ties) without a pass of top_k over
    the vocabulary; monotone: an elementwise map, non-decreasing in each row, applied only to what is read;
    chunk_max: x's chunk maxima where the caller has them already.

    The k largest entries lie in the k chunks with the largest maxima, so top_k runs on those chunks' maxima and
    then on the k·CHUNK entries they hold, kept in vocabulary order so ties still resolve to the lower index. An
    entry below the k-th of those maxima has k larger ones and is masked to -inf first: XLA's CPU TopK then rejects
    it at once instead of inserting it into its heap. A non-decreasing map commutes with max, rounding included, so
    monotone(chunk_max) are monotone(x)'s chunk maxima.
    """
    if x.shape[-1] <= k * CHUNK:
        return _top_k(monotone(x), k)
    chunks = _chunked(x, -jnp.inf)
    if chunk_max is None:
        chunk_max = jnp.max(chunks, axis=-1)
    rows = chunks.shape[0]
    chosen_max, chosen = _top_k(monotone(chunk_max), k)
    chosen = jnp.sort(chosen, axis=-1)
    values = monotone(jnp.take_along_axis(chunks, chosen[:, :, None], axis=1).reshape(rows, k * CHUNK))
    values = jnp.where(values >= chosen_max[:, -1:], values, -jnp.inf)
    top, position = _top_k(values, k)
    index = jnp.take_along_axis(chosen, position // CHUNK, axis=1) * CHUNK + position % CHUNK
    return top, index.astype(jnp.int32)


def _inverse_cdf(weights: jax.Array, u: jax.Array, reach: bool = False) -> jax.Array:
    """Per row, the position where the running sum of non-negative weights first exceeds u·total (u in [0, 1)), or
    with reach, first reaches it."""
    running = jnp.cumsum(weights, axis=-1)
    target = u * running[:, -1]
    position = jnp.sum((running < target[:, None]) if reach else (running <= target[:, None]), axis=-1)
    last = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.minimum(position, last).astype(jnp.int32)


def _inverse_cdf_chunked(weights: jax.Array, u: jax.Array, reach: bool = False) -> jax.Array:
    """_inverse_cdf over a whole vocabulary, a chunk at a time: over the chunks' sums, then within the chunk it picks
    (XLA's CPU cumsum over a whole vocabulary costs milliseconds a row)."""
    chunks = _chunked(weights, 0.0)
    sums = jnp.sum(chunks, axis=-1)
    chunk = _inverse_cdf(sums, u, reach)
    running = jnp.cumsum(sums, axis=-1)
    before = jnp.take_along_axis(running - sums, chunk[:, None], axis=1)[:, 0]
    mass = jnp.take_along_axis(sums, chunk[:, None], axis=1)[:, 0]
    inner = jnp.clip((u * running[:, -1] - before) / mass, 0.0, 1.0 - 1e-7)
    within = _inverse_cdf(jnp.take_along_axis(chunks, chunk[:, None, None], axis=1)[:, 0], inner, reach)
    return chunk * CHUNK + within


def _draw_vocabulary(scaled: jax.Array, u: jax.Array) -> jax.Array:
    """A draw from softmax(scaled) over the whole vocabulary."""
    return _inverse_cdf_chunked(jnp.exp(scaled), u)


def _draw_candidates(values: jax.Array, index: jax.Array, vocabulary_log_total: jax.Array, top_k: jax.Array,
                     top_p: jax.Array, u: jax.Array):
    """(token, fits) per row: a draw after top-k then top-p among the candidates (the row's largest scaled logits,
    descending, and their ids), and whether they hold every token the row's filters keep (so the draw is the exact
    one). vocabulary_log_total: log Σ exp(scaled) over the whole vocabulary, read only by rows without top-k."""
    k = values.shape[-1]
    keep_k = jnp.arange(k)[None, :] < jnp.where((top_k > 0) & (top_k <= k), top_k, k)[:, None]
    # top-p normalises over what top-k keeps: the candidates when top_k <= k, the whole vocabulary when top_k is 0
    log_total = jnp.where(top_k > 0, jax.nn.logsumexp(jnp.where(keep_k, values, -jnp.inf), axis=-1),
                          vocabulary_log_total)
    probs = jnp.where(keep_k, jnp.exp(values - log_total[:, None]), 0.0)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1))
    position = _inverse_cdf(jnp.where(keep, jnp.exp(values - values[:, :1]), 0.0), u)
    fits = ((top_k > 0) & (top_k <= k)) | ((top_k == 0) & (top_p < 1) & (jnp.sum(probs, axis=-1) >= top_p))
    return jnp.take_along_axis(index, position[:, None], axis=1)[:, 0], fits


def _flip_non_negative(bits: jax.Array) -> jax.Array:
    """Reverse the order of the non-negative floats' bit patterns below the negative ones; its own inverse."""
    return jnp.where(bits >> 31 == 1, bits, bits ^ 0x7FFFFFFF)


def _descending_keys(x: jax.Array) -> jax.Array:
    """uint32 keys whose ascending order is x's descending order (0.0 before -0.0, as lax.sort orders floats)."""
    return _flip_non_negative(jax.lax.bitcast_convert_type(x, jnp.uint32))


def _from_descending_keys(keys: jax.Array) -> jax.Array:
    """The floats _descending_keys made these keys from."""
    return jax.lax.bitcast_convert_type(_flip_non_negative(keys), jnp.float32)


def _draw_sorted(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, u: jax.Array) -> jax.Array:
    """The exact draw after top-k then top-p over the whole vocabulary in descending order, lower index first on ties
    (for filters the candidates can't hold).

    XLA's CPU backend sorts integers with a plain comparison, several times faster than floats carried with their
    indices, so this sorts the logits' order-preserving keys alone, draws a position in that order, and then finds
    its token: the entry holding the drawn key that has as many equal keys before it as the position does.
    """
    vocab = scaled.shape[-1]
    keys = _descending_keys(scaled)
    ordered_keys = jax.lax.sort(keys, dimension=-1)
    weights = jnp.where(_top_k_keep(vocab, top_k), jnp.exp(_from_descending_keys(ordered_keys)), 0.0)
    kept = jnp.arange(vocab)[None, :] < _top_p_count(weights, top_p)[:, None]
    position = _inverse_cdf_chunked(jnp.where(kept, weights, 0.0), u)
    key = jnp.take_along_axis(ordered_keys, position[:, None], axis=-1)
    rank = position - jnp.sum(ordered_keys < key, axis=-1)
    holds_key = (keys == key).astype(jnp.float32)
    return _inverse_cdf_chunked(holds_key, (rank + 0.5) / jnp.sum(holds_key, axis=-1))


def _draw_sorted_rows(sorts: jax.Array, logits: jax.Array, shift: jax.Array, temperature: jax.Array,
                      top_k: jax.Array, top_p: jax.Array, u: jax.Array) -> jax.Array:
    """_draw_sorted of (logits - shift) / temperature in the rows where `sorts` is set (0 elsewhere), one row at a
    time: a sort costs milliseconds a row, so a batch pays only for the rows whose filters need one."""
    def row(args):
        sorts, x, shift, temperature, top_k, top_p, u = args
        return jax.lax.cond(sorts, lambda: _draw_sorted((x[None] - shift) / temperature, top_k[None], top_p[None],
                                                        u[None])[0], lambda: jnp.int32(0))

    return jax.lax.map(row, (sorts, logits, shift, temperature, top_k, top_p, u))


def _draw(logits: jax.Array, chunk_max: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
          keys: jax.Array):
    """Each sampling row's token by the cheapest exact path for that row; a path runs only if some row needs it.

    The scaled logits are never written out whole: each path scales what it reads (in the candidates' case, the
    chunk maxima already found and the chunks they choose), so a batch of top-k and top-p rows reads the
    vocabulary twice, once for the chunk maxima and once for the sum of exponentials that top-p normalises by."""
    rows = logits.shape[0]
    # shift so the maximum is 0 before dividing: tiny temperatures then give -inf, never +inf or nan
    row_max = jnp.max(chunk_max, axis=-1, keepdims=True)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    # XLA rewrites each division by t into this product anyway; made here, outside the candidates' branch, its buffer
    # outlives the branch, so the TopKs can't be handed it and made to wait for the vocabulary-wide sum that reads it
    inverse_t = 1.0 / t

    def scale(x):
        return (x - row_max) * inverse_t

    u = jax.vmap(lambda key: jax.random.uniform(key, ()))(jax.random.wrap_key_data(keys))
    sampling = temperature > 0
    unfiltered = (top_k == 0) & (top_p >= 1)

    def draw_candidates(normalised: bool):
        """_draw_candidates, with the vocabulary's normaliser if some row needs it: in one computation with the
        candidates' TopKs, which it shares nothing with, so XLA's CPU runtime runs the two side by side."""
        values, index = top_candidates(logits, min(CANDIDATES, logits.shape[-1]), scale, chunk_max)
        # materialised once: fused into its (rows, k) consumers, the vocabulary-wide sum would be redone per candidate
        log_total = (jax.lax.optimization_barrier(jnp.log(jnp.sum(jnp.exp(scale(logits)), axis=-1))) if normalised
                     else jnp.zeros((rows,), jnp.float32))
        return _draw_candidates(values, index, log_total, top_k, top_p, u)

    by_candidates, fits = jax.lax.cond(jnp.any(sampling & (top_k == 0) & (top_p < 1)),
                                       partial(draw_candidates, True), partial(draw_candidates, False))
    nothing = jnp.zeros((rows,), jnp.int32)
    by_vocabulary = jax.lax.cond(jnp.any(sampling & unfiltered), lambda: _draw_vocabulary(scale(logits), u),
                                 lambda: nothing)
    sorts = sampling & ~unfiltered & ~fits
    by_sorting = jax.lax.cond(jnp.any(sorts), lambda: _draw_sorted_rows(sorts, logits, row_max, t, top_k, top_p, u),
                              lambda: nothing)
    return jnp.where(unfiltered, by_vocabulary, jnp.where(fits, by_candidates, by_sorting))


def _draw_order(temperature: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Rows in the order they are drawn: top-p-only rows (they need the vocabulary's normaliser), unfiltered rows (a
    draw over the whole vocabulary), top-k rows, then greedy rows (not drawn); stable, so ties keep batch order."""
    path = jnp.select([temperature == 0, top_k > 0, top_p >= 1], [3, 2, 1], 0)
    return jnp.argsort(path, stable=True).astype(jnp.int32)


def _draw_in_blocks(logits: jax.Array, chunk_max: jax.Array, temperature: jax.Array, top_p: jax.Array,
                    top_k: jax.Array, keys: jax.Array) -> jax.Array:
    """_draw of every row, DRAW_ROWS rows at a time in _draw_order, skipping blocks with no sampling row: a batch pays
    for its sampling rows only, and each path only for the blocks of rows that take it (0 for greedy rows)."""
    rows = logits.shape[0]
    block = min(DRAW_ROWS, rows)
    blocks = -(-rows // block)
    order = jnp.pad(_draw_order(temperature, top_p, top_k), (0, blocks * block - rows), constant_values=rows)
    sampling = jnp.pad(temperature > 0, (0, 1))  # the padding row (index rows) does not sample

    def draw_block(_, picked):
        def of(a):
            return a[jnp.minimum(picked, rows - 1)]

        drawn = jax.lax.cond(jnp.any(sampling[picked]),
                             lambda: _draw(of(logits), of(chunk_max), of(temperature), of(top_p), of(top_k), of(keys)),
                             lambda: jnp.zeros((block,), jnp.int32))
        return None, drawn

    _, drawn = jax.lax.scan(draw_block, None, order.reshape(blocks, block))
    return jnp.zeros((rows,), jnp.int32).at[order].set(drawn.reshape(-1), mode="drop")


@jax.jit
def sample(
    logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array, keys: jax.Array
) -> jax.Array:
    """Next token per row: argmax where temperature is 0, else a draw after temperature, top-k then top-p.

    logits (rows, vocab); temperature, top_p float32 (rows,); top_k int32 (rows,); keys (rows, 2) uint32 key data.
    Returns int32 (rows,). A batch of greedy rows costs one argmax; the draws run only when a row samples, and
    share the argmax's chunk maxima.
    """
    logits = logits.astype(jnp.float32)
    chunks = _chunked(logits, -jnp.inf)
    # materialised: XLA would otherwise fold the row maxima taken from it into a second pass over the vocabulary
    chunk_max = jax.lax.optimization_barrier(jnp.max(chunks, axis=-1))
    greedy = _first_argmax(chunks, chunk_max)

    def draw_or_greedy(draw):
        return jnp.where(temperature == 0, greedy, draw(logits, chunk_max, temperature, top_p, top_k, keys))

    sampling = jnp.sum(temperature > 0)
    # blocks pay a gather of their rows and _draw's per-call costs once per block: worth it up to half the rows
    path = jnp.where(sampling == 0, 0, jnp.where(2 * sampling <= temperature.shape[0], 1, 2))
    return jax.lax.switch(path, [lambda: greedy, partial(draw_or_greedy, _draw_in_blocks),
                                 partial(draw_or_greedy, _draw)])


@jax.jit
def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Key data (rows, 2) uint32 from each row's seed and step, independent of the row's place in the batch."""
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, steps)
    return jax.random.key_data(keys)
