"""Continuous batching in JetStream's shape: bucketed prefill, insert into a free decode row, one decode step for all rows.

The decode state (a KV cache of `rows` rows) stays on the device and is donated to every step. The host
keeps the small per-row bookkeeping; each `step()` first makes a StepPlan (which requests join which rows
with which adapter slots or compressed (cluster, Σ id) pairs, and which rows decode), then carries it out. Every jitted function has fixed
shapes, so once each prompt bucket has been seen, steady-state generation compiles nothing new.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..distributed import to_host
from ..errors import AdapterError, BdloraError, PoolFullError
from ..model.llama import AdapterBatch, cache_shapes, forward, init_cache, slot_groups
from ..text_stream import TextStream
from .logprobs import TokenLogprob, row_logprob, token_logprobs
from .penalties import adjust, history, prompt_mask, record_tokens_jit, reset_rows_jit
from .sampler import (
    MAX_LOGIT_BIAS,
    MAX_MIN_TOKENS_STOP_IDS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
    first_argmax,
    row_keys,
    sample,
)

MIN_BUCKET = 16
MAX_PREFILL_TOKENS = 512  # tokens of one batched prefill call (prompts x bucket), unless one prompt needs more
_ids = itertools.count()


def adapter_batch(bank, compressed: dict | None, slots, clusters, sigma_ids, groups=None) -> AdapterBatch:
    """The model's AdapterBatch for per-row bank slots and, with a compressed bank, per-row (cluster, Σ id);
    groups: the distinct slots in use, padded with 0 (see AdapterBatch)."""
    if compressed is None:
        return AdapterBatch(bank, slots, groups=groups)
    return AdapterBatch(bank, slots, compressed=compressed, clusters=clusters, sigma_ids=sigma_ids, groups=groups)


@partial(jax.jit, static_argnames=("top_logprobs",))
def _sample(logits: jax.Array, sampling: tuple[jax.Array, jax.Array], adjustments=None, top_logprobs: int = 0):
    """The sampler on per-row (temperature, top_p) floats and (top_k, seed, step) ints, keys made on the device;
    its own jitted call (compiled once per row count and variant) rather than a part of every prefill and decode one.

    Two variants per row count: the plain one (adjustments None, top_logprobs 0: the logits as they are), and the full
    one: adjustments (ids, values, penalties, seen, counts, state rows) for penalties.adjust and top_logprobs k to
    return token_logprobs(raw logits, tokens, k). Returns (tokens, None or the log-probabilities).
    """
    floats, ints = sampling
    raw = logits.astype(jnp.float32)
    chosen_from = raw
    if adjustments is not None:
        ids, values, penalties, seen, counts, rows = adjustments
        chosen_from = adjust(raw, ids, values, *history(seen, counts, rows), penalties)
    tokens = sample(chosen_from, floats[0], floats[1], ints[0], row_keys(ints[1], ints[2]))
    return tokens, (token_logprobs(raw, tokens, top_logprobs) if top_logprobs else None)


def fetch_sampled(*arrays: jax.Array) -> list[np.ndarray]:
    """The sampled tokens (and log-probabilities) of a step on this process's host; a multi-process server
    replaces it so that the leader's values reach the followers (replica_ops)."""
    return [to_host(a) for a in arrays]


def _insert(cache, prompt_cache, rows):
    """Copy each prefilled row into its decode row of every layer's cache (a row index past the end: skipped);
    positions are the last axis of the (transposed) key cache and the third of the value cache."""
    length = prompt_cache[0][1].shape[2]
    return tuple((keys.at[rows, :, :, :length].set(new_keys, mode="drop"),
                  values.at[rows, :, :length].set(new_values, mode="drop"))
                 for (keys, values), (new_keys, new_values) in zip(cache, prompt_cache))


def geometric_sizes(low: int, high: int, factor: int) -> list[int]:
    """low, factor·low, factor²·low, ... below high, then high: the sizes a batch dimension is padded to, so a
    handful of shapes (and compiles) cover every count."""
    sizes, n = [], low
    while n < high:
        sizes.append(n)
        n *= factor
    return sizes + [high]


def bucket(n: int, sizes: list[int]) -> int:
    """The smallest size that holds n."""
    return next(s for s in sizes if s >= n)


def prompt_buckets(max_seq_len: int) -> list[int]:
    """Prefill lengths that get compiled: powers of two from MIN_BUCKET, and max_seq_len itself."""
    buckets, b = [], MIN_BUCKET
    while b < max_seq_len:
        buckets.append(b)
        b *= 2
    return buckets + [max_seq_len]


def prompt_bucket(length: int, max_seq_len: int) -> int:
    """The smallest prefill bucket that holds `length` tokens."""
    return next(b for b in prompt_buckets(max_seq_len) if b >= length)


@dataclass
class Request:
    """One prompt to complete under one adapter (None = base model); on_token sees every new token."""

    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    on_token: Callable[[Request, int], None] | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token when params.logprobs is set
    finish_reason: str | None = None
    error: BdloraError | None = None  # why it ended with finish_reason "error", when the cause was its own
    stop_search: TextStream | None = None  # finds its stop strings in its text, a few new characters per token
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float | None = None  # time.monotonic() when the scheduler took it (the latency histograms' start)
    first_token_time: float | None = None  # time.monotonic() of the step that produced its first token


@dataclass
class Completion:
    """Generated tokens of one request, their text (when the model has a tokenizer), why it stopped, and each token's
    log-probabilities when the request asked for them."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class StepPlan:
    """What one step does, small and serialisable: admissions (row, request id, slot, cluster, Σ id) and the
    decode rows with their slots, clusters and Σ ids (cluster and Σ id 0 unless a row uses a compressed adapter)."""

    admit: tuple[tuple[int, int, int, int, int], ...]
    decode_slots: tuple[int, ...]
    decode_rows: tuple[int, ...]
    decode_clusters: tuple[int, ...] = ()
    decode_sigma_ids: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()


class Generator:
    """Owns the decode state of `rows` rows and moves requests through prefill, insert and decode."""

    def __init__(self, engine):
        self.engine = engine
        data = engine.plan.data_size
        self.rows = -(-engine.config.max_batch // data) * data
        self.max_seq_len = engine.config.max_seq_len
        self._cache_dtype = jnp.dtype(engine.config.dtype)
        self.max_loras = engine.config.max_loras
        self.group_sizes = geometric_sizes(1, max(1, min(self.max_loras, self.rows)), 2)
        self._init_kv_cache()
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.adapter_errors: dict[int, AdapterError] = {}  # schedule's refusals, by request id, until step ends them
        self.tokens = np.zeros(self.rows, np.int32)
        self.positions = np.zeros(self.rows, np.int32)
        self.generated_tokens = 0
        self.preemptions = 0  # requests preempted for KV pages (a paged cache only)
        vocab = engine.model_config.vocab_size
        self.eos_ids = frozenset(engine.model_config.eos_token_ids)
        self.adjust_width = MAX_LOGIT_BIAS + MAX_MIN_TOKENS_STOP_IDS + len(self.eos_ids)
        self.top_logprobs = min(MAX_TOP_LOGPROBS, vocab)
        # per decode row: the prompt's tokens and how often each token was generated (kept for the penalties)
        # on the mesh, replicated, from the start: as the jitted updates return them, so they compile once
        replicated = engine.plan.sharding(())
        self.seen = jax.device_put(np.zeros((self.rows, vocab), bool), replicated)
        self.counts = jax.device_put(np.zeros((self.rows, vocab), np.int32), replicated)
        self.fetch_sampled: Callable[..., list[np.ndarray]] = fetch_sampled

    def kv_pages(self) -> tuple[int, int]:
        """(pages held, pages in the pool) of a paged cache; a contiguous cache has no pages: (0, 0)."""
        return 0, 0

    def prefix_cache_tokens(self) -> tuple[int, int]:
        """(tokens looked up, tokens found) in a paged cache's prefix cache; a contiguous cache has none: (0, 0)."""
        return 0, 0

    def _init_kv_cache(self) -> None:
        """The contiguous KV cache of `rows` rows of max_seq_len tokens, and the jitted calls that use it."""
        cfg, plan = self.engine.model_config, self.engine.plan
        self.cache = init_cache(cfg, plan, self.rows, self.max_seq_len, self._cache_dtype)
        self.prefill_sizes = geometric_sizes(plan.data_size, self.rows, 4)
        self._prefill_jit = jax.jit(self._prefill_fn, donate_argnums=(1,))
        self._decode_jit = jax.jit(self._decode_fn, donate_argnums=(1,))
        self._decode_base_jit = jax.jit(self._decode_base_fn, donate_argnums=(1,))

    def prefill_batches(self, length_bucket: int) -> list[int]:
        """Prompt counts a prefill call of this length bucket is compiled for (at most MAX_PREFILL_TOKENS tokens,
        and always one data-sized batch)."""
        sizes = [n for n in self.prefill_sizes if n * length_bucket <= MAX_PREFILL_TOKENS]
        return sizes or self.prefill_sizes[:1]

    def _prefill_fn(self, state, cache, bank, compressed, tokens, lengths, ids, groups, rows):
        """Run a batch of prompts (padded to their length bucket), insert their KV into decode rows `rows` of the
        (donated) decode cache, and return the logits of each prompt's last real position; one compile per shape.

        ids = per-row (slots, clusters, Σ ids); groups = the distinct slots in use (see AdapterBatch)."""
        cfg = self.engine.model_config
        prompts, length = tokens.shape
        zeros = tuple(jnp.zeros(shape, self._cache_dtype) for shape in cache_shapes(cfg, prompts, length))
        prompt_cache = tuple(zeros for _ in range(cfg.num_layers))
        last, prompt_cache = forward(self.engine.graphdef, state, tokens, jnp.zeros((prompts,), jnp.int32),
                                     prompt_cache, adapter_batch(bank, compressed, *ids, groups), lengths - 1)
        return last, _insert(cache, prompt_cache, rows)

    def _decode_fn(self, state, cache, bank, compressed, tokens, positions, ids, groups):
        """One token for every row: write its KV at its position, attend, return the next-token logits and their
        argmax (taken while the logits are at hand: an all-greedy batch then needs no sampler call).

        ids = per-row (slots, clusters, Σ ids); groups = the distinct slots in use (see AdapterBatch)."""
        logits, cache = forward(self.engine.graphdef, state, tokens[:, None], positions, cache,
                                adapter_batch(bank, compressed, *ids, groups))
        return logits[:, 0], first_argmax(logits[:, 0]), cache

    def _decode_base_fn(self, state, cache, tokens, positions):
        """`_decode_fn` for a step in which no row uses an adapter: the base model alone."""
        logits, cache = forward(self.engine.graphdef, state, tokens[:, None], positions, cache)
        return logits[:, 0], first_argmax(logits[:, 0]), cache

    def groups(self, slots) -> jax.Array:
        """The distinct slots in use, padded with 0 to the next compiled group count."""
        used = len({int(s) for s in slots if s > 0})
        return slot_groups(slots, bucket(max(used, 1), self.group_sizes))

    @staticmethod
    def _sampling(params: list[SamplingParams], steps: list[int]):
        """Per-row sampling arrays; a request without a seed draws from its id so rows never share a stream."""
        floats = np.array([[p.temperature for p in params], [p.top_p for p in params]], np.float32)
        ints = np.array([[p.top_k for p in params], [p.seed for p in params], steps], np.int32)
        return floats, ints

    def submit(self, request: Request) -> None:
        if request.params.seed is None:
            request.params = SamplingParams(**{**request.params.__dict__, "seed": request.id})
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def adapters_in_use(self) -> set[str]:
        return {r.adapter for r in self.running.values() if r.adapter is not None}

    def drop_cancelled(self) -> list[Request]:
        """End the cancelled requests (e.g. a client that disconnected), freeing their rows and queue places; the
        scheduler calls it as it applies cancellations, so an abort is booked before the next step, not after it."""
        dropped = [r for r in [*self.running.values(), *self.waiting] if r.cancelled]
        for request in dropped:
            request.finish_reason = "abort"
        self.running = {row: r for row, r in self.running.items() if not r.cancelled}
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        return dropped

    def schedule(self) -> StepPlan:
        """Decide this step: admit waiting requests in arrival order while rows and adapter slots allow.

        Adapters of running requests are pinned, so loading a new one only evicts an idle adapter; a request
        whose adapter cannot get a slot waits (and so do the ones behind it, keeping arrival order). Compressed
        adapters take no slot.
        """
        taken = {row: r.adapter for row, r in self.running.items()}
        free_rows = [i for i in range(self.rows) if i not in taken]
        admit, failed = [], []
        for request in self.waiting:
            if not free_rows:
                break
            try:
                slots, clusters, sigma_ids = self.engine.resolve([*taken.values(), request.adapter])
            except PoolFullError:
                break
            except AdapterError as e:  # its files changed or vanished since registration: this request fails alone
                failed.append(request.id)
                self.adapter_errors[request.id] = e
                continue
            row = free_rows.pop(0)
            taken[row] = request.adapter
            admit.append((row, request.id, slots[-1], clusters[-1], sigma_ids[-1]))
        rows = tuple(sorted(taken))
        slots, clusters, sigma_ids = self.engine.resolve([taken[i] for i in rows]) if rows else ((), (), ())
        return StepPlan(tuple(admit), tuple(slots), rows, tuple(clusters), tuple(sigma_ids), tuple(failed))

    def step(self) -> list[Request]:
        """Plan and run one step: prefill admissions, then one decode token for all rows; returns finished requests."""
        finished = self.drop_cancelled()
        plan = self.schedule()
        waiting = {r.id: r for r in self.waiting}
        for request_id in plan.failed:
            request = waiting[request_id]
            self.waiting.remove(request)
            request.finish_reason = "error"
            request.error = self.adapter_errors.pop(request_id, None)
            finished.append(request)
        admitted = []
        for row, request_id, *ids in plan.admit:
            request = waiting[request_id]
            self.waiting.remove(request)
            admitted.append((row, request, ids))
        for row, request, logprob in self._prefill_admitted(admitted):
            if self._emit(request, self.tokens[row], logprob):
                finished.append(request)
            else:
                self.running[row] = request
        decode_rows = [row for row in plan.decode_rows if row in self.running]
        if decode_rows:
            new, logprobs = self.decode(plan)
            for row in decode_rows:
                request = self.running[row]
                self.tokens[row], self.positions[row] = new[row], self.positions[row] + 1
                if self._emit(request, int(new[row]), self._logprob(request, logprobs, row, new[row])):
                    del self.running[row]
                    finished.append(request)
        return finished

    def decode(self, plan: StepPlan) -> tuple[np.ndarray, tuple | None]:
        """Run the decode step of a plan; returns each row's token and, when a row asked for them, the
        log-probabilities (see _sample_rows)."""
        logits, greedy = self._decode_logits(plan)
        return self._sample_rows(logits, [self.running.get(i) for i in range(self.rows)],
                                 np.arange(self.rows, dtype=np.int32), greedy=greedy)

    def _decode_logits(self, plan: StepPlan) -> tuple[jax.Array, jax.Array]:
        """The next-token logits of every decode row and their argmax, by the base-model step when no row uses an
        adapter."""
        ids = np.zeros((3, self.rows), np.int32)
        for array, values in zip(ids, (plan.decode_slots, plan.decode_clusters, plan.decode_sigma_ids)):
            array[list(plan.decode_rows)] = values
        tokens, positions = self.tokens, self.positions
        if not ids[0].any() and not ids[2].any():
            logits, greedy, self.cache = self._decode_base_jit(self.engine.state, self.cache, tokens, positions)
        else:
            logits, greedy, self.cache = self._decode_jit(self.engine.state, self.cache, self.engine.pool.bank,
                                                          self.engine.compressed_arrays, tokens, positions, ids,
                                                          self.groups(ids[0]))
        return logits, greedy

    def _sample_rows(self, logits: jax.Array, requests: list[Request | None], state_rows: np.ndarray,
                     prompts: list[list[int]] | None = None, greedy: jax.Array | None = None
                     ) -> tuple[np.ndarray, tuple | None]:
        """One token per row of `logits` for `requests` (None: an idle row) whose histories are decode rows
        `state_rows`: the plain _sample variant unless a row adjusts its logits or asks for log-probabilities;
        prompts: the rows' prompts when they are just admitted (their histories start there); greedy: the logits'
        argmax, if at hand, which is the answer when every row is greedy and plain.
        Returns host (tokens, token_logprobs arrays or None)."""
        params = [r.params if r is not None else _IDLE for r in requests]
        adjusting = [r is not None and (r.params.adjusts_logits or len(r.output) < r.params.min_tokens)
                     for r in requests]
        steps = [len(r.output) if r is not None else 0 for r in requests]
        plain = not any(adjusting) and all(p.logprobs is None for p in params)
        if plain and greedy is not None and all(p.temperature == 0 for p in params):
            return self.fetch_sampled(greedy)[0], None
        if plain:
            tokens, _ = _sample(logits, self._sampling(params, steps))
            return self.fetch_sampled(tokens)[0], None
        if prompts is not None:
            seen = prompt_mask(prompts, len(requests), self.seen.shape[1])
            self.seen, self.counts = reset_rows_jit(self.seen, self.counts, state_rows, seen)
        adjustments = (*self._adjustment_arrays(requests, adjusting), self.seen, self.counts, state_rows)
        tokens, logprobs = _sample(logits, self._sampling(params, steps), adjustments, top_logprobs=self.top_logprobs)
        self.counts = record_tokens_jit(self.counts, state_rows, tokens)
        tokens, *logprobs = self.fetch_sampled(tokens, *logprobs)
        return tokens, tuple(logprobs)

    def _adjustment_arrays(self, requests: list[Request | None], adjusting: list[bool]):
        """Per-row (ids, values) of the sparse additions (logit_bias, and -inf on the stop tokens of a row still
        under min_tokens), padded to adjust_width, and the (repetition, frequency, presence) penalties (3, rows)."""
        ids = np.zeros((len(requests), self.adjust_width), np.int32)
        values = np.zeros((len(requests), self.adjust_width), np.float32)
        penalties = np.tile(np.array([[1.0], [0.0], [0.0]], np.float32), (1, len(requests)))
        for i, (request, on) in enumerate(zip(requests, adjusting)):
            if not on:
                continue
            params = request.params
            entries = list(params.logit_bias)
            if len(request.output) < params.min_tokens:
                entries += [(t, -np.inf) for t in sorted(self._stop_ids(params))]
            if entries:
                ids[i, :len(entries)], values[i, :len(entries)] = zip(*entries)
            penalties[:, i] = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
        return ids, values, penalties

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        """The tokens that end a request: its stop_token_ids, and the model's EOS unless it ignores EOS."""
        return set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))

    @staticmethod
    def _logprob(request: Request, logprobs: tuple | None, index: int, token: int) -> TokenLogprob | None:
        """The TokenLogprob a request asked for, from row `index` of _sample_rows' log-probabilities."""
        if request.params.logprobs is None:
            return None
        return row_logprob(logprobs, index, token, request.params.logprobs)

    def _prefill_admitted(self, admitted: list[tuple[int, Request, list[int]]]) -> list[tuple]:
        """Prefill admitted (row, request, (slot, cluster, Σ id)) in batched calls, one length bucket at a time,
        each call as many prompts as its largest compiled count that the rest fill; returns (row, request,
        TokenLogprob of the first token or None)."""
        by_bucket: dict[int, list] = {}
        for entry in admitted:
            by_bucket.setdefault(prompt_bucket(len(entry[1].prompt), self.max_seq_len), []).append(entry)
        done = []
        for length, entries in by_bucket.items():
            sizes = self.prefill_batches(length)
            while entries:
                size = max([n for n in sizes if n <= len(entries)] or sizes[:1])
                chunk, entries = entries[:size], entries[size:]
                logprobs = self._prefill_batch(chunk, length, size)
                done.extend((row, request, logprob) for (row, request, _), logprob in zip(chunk, logprobs))
        return done

    def _prefill_batch(self, chunk: list[tuple[int, Request, list[int]]], length: int, size: int) -> list:
        """One prefill call: `chunk`'s prompts padded to `length` tokens and `size` rows, copied into their rows;
        returns the first token's TokenLogprob (or None) of each prompt."""
        last, rows = self._prefill_logits(chunk, length, size)
        requests = [request for _, request, _ in chunk] + [None] * (size - len(chunk))
        first, logprobs = self._sample_rows(last, requests, rows, [r.prompt for _, r, _ in chunk])
        for i, (row, request, _) in enumerate(chunk):
            self.tokens[row], self.positions[row] = first[i], len(request.prompt)
        return [self._logprob(request, logprobs, i, first[i]) for i, (_, request, _) in enumerate(chunk)]

    def _prefill_logits(self, chunk: list[tuple[int, Request, list[int]]], length: int, size: int):
        """(last-position logits, decode row of each prompt) of one prefill call that also fills those rows' cache."""
        tokens = np.zeros((size, length), np.int32)
        lengths = np.ones(size, np.int32)
        ids = np.zeros((3, size), np.int32)
        rows = np.full(size, self.rows, np.int32)  # padding rows are dropped by the insert
        for i, (row, request, request_ids) in enumerate(chunk):
            tokens[i, :len(request.prompt)] = request.prompt
            lengths[i], ids[:, i], rows[i] = len(request.prompt), request_ids, row
        last, self.cache = self._prefill_jit(self.engine.state, self.cache, self.engine.pool.bank,
                                             self.engine.compressed_arrays, tokens, lengths, ids,
                                             slot_groups(ids[0], min(size, max(self.max_loras, 1))), rows)
        return last, rows

    def warm_up(self) -> None:
        """Compile every prefill (length bucket x prompt count), insert and decode variant, each with every sampler
        variant, so serving compiles nothing new; the decode state is left as it was (all rows idle)."""
        for length in prompt_buckets(self.max_seq_len):
            for size in self.prefill_batches(length):
                self._warm_sampler(*self._prefill_logits([], length, size), prompts=[[0]])
        for groups in [0, *self.group_sizes]:
            slots = tuple(range(1, groups + 1)) + (0,) * (self.rows - groups)
            plan = StepPlan((), slots, tuple(range(self.rows)), (0,) * self.rows, (0,) * self.rows)
            self._warm_sampler(self._decode_logits(plan)[0], np.full(self.rows, self.rows, np.int32), prompts=None)

    def _warm_sampler(self, logits: jax.Array, past_end: np.ndarray, prompts: list[list[int]] | None) -> None:
        """Run both _sample variants (plain, full) on `logits` as _sample_rows does, for requests whose state rows
        lie past the end, so the penalty state is left as it was."""
        for params in _WARM_UP_PARAMS:
            requests = [Request([0], None, params)] + [None] * (len(past_end) - 1)
            self._sample_rows(logits, requests, past_end, prompts)

    def _emit(self, request: Request, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record a token (and its log-probabilities), tell the listener, and return whether the request is now
        finished: by a stop token, EOS (unless ignore_eos) or stop string once min_tokens are out, or by length."""
        if logprob is not None:
            request.logprobs.append(logprob)
        request.output.append(int(token))
        self.generated_tokens += 1
        params = request.params
        may_stop = len(request.output) >= params.min_tokens
        if params.stop and self.engine.tokenizer is not None:
            if request.stop_search is None:
                request.stop_search = TextStream(self.engine.tokenizer, params.stop, params.min_tokens)
            request.stop_search.delta(request.output, final=False)
        stop_string = request.stop_search is not None and request.stop_search.stopped
        if may_stop and (request.output[-1] in self._stop_ids(params) or stop_string):
            request.finish_reason = "stop"
        elif len(request.output) >= params.max_tokens:
            request.finish_reason = "length"
        if request.on_token is not None:
            request.on_token(request, int(token))
        return request.finish_reason is not None

    def run(self, requests: list[Request]) -> list[Request]:
        """Complete every request (offline use): submit all, step until none is left."""
        for request in requests:
            self.submit(request)
        while self.has_work():
            self.step()
        return requests


_IDLE = SamplingParams(temperature=0.0, seed=0)
_WARM_UP_PARAMS = (_IDLE, SamplingParams(temperature=0.0, seed=0, repetition_penalty=2.0, logprobs=0))
