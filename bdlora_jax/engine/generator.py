"""Continuous batching in JetStream's shape: bucketed prefill, insert into a free decode row, one decode step for all rows.

The decode state (a KV cache of `rows` rows) stays on the device and is donated to every step. The host
keeps the small per-row bookkeeping; each `step()` first makes a StepPlan (which requests join which rows
with which adapter slots or compressed (cluster, Σ id) pairs, and which rows decode), then carries it out. Every jitted function has fixed
shapes, so once each prompt bucket has been seen, steady-state generation compiles nothing new.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..model.llama import AdapterBatch, forward, init_cache
from ..lora.peft_io import AdapterError
from .adapter_pool import PoolFullError
from .sampler import SamplingParams, row_keys, sample

MIN_BUCKET = 16
_ids = itertools.count()


def adapter_batch(bank, compressed: dict | None, slots, clusters, sigma_ids) -> AdapterBatch:
    """The model's AdapterBatch for per-row bank slots and, with a compressed bank, per-row (cluster, Σ id)."""
    if compressed is None:
        return AdapterBatch(bank, slots)
    return AdapterBatch(bank, slots, compressed=compressed, clusters=clusters, sigma_ids=sigma_ids)


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
    on_token: Callable[["Request", int], None] | None = None
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class Completion:
    """Generated tokens of one request, their text (when the model has a tokenizer) and why it stopped."""

    token_ids: list[int]
    text: str | None
    finish_reason: str


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
        cfg, plan = engine.model_config, engine.plan
        self.rows = -(-engine.config.max_batch // plan.data_size) * plan.data_size
        self.max_seq_len = engine.config.max_seq_len
        dtype = jnp.dtype(engine.config.dtype)
        self.cache = init_cache(cfg, plan, self.rows, self.max_seq_len, dtype)
        self._prefill_rows = plan.data_size
        self._cache_shape = (self._prefill_rows, self.max_seq_len, cfg.num_kv_heads, cfg.head_dim)
        self._cache_dtype = dtype
        self._prefill = jax.jit(self._prefill_fn)
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0,))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.tokens = np.zeros(self.rows, np.int32)
        self.positions = np.zeros(self.rows, np.int32)
        self.generated_tokens = 0

    def _prefill_fn(self, state, bank, compressed, tokens, length, ids, sampling):
        """Run one prompt (row 0 of a data-sized batch) and sample its first token from its last real position.

        ids = (slot, cluster, Σ id) of the prompt's adapter."""
        rows = tokens.shape[0]
        zeros = jnp.zeros(self._cache_shape, self._cache_dtype)
        cache = tuple((zeros, zeros) for _ in range(self.engine.model_config.num_layers))
        slots, clusters, sigma_ids = (jnp.zeros((rows,), jnp.int32).at[0].set(i) for i in ids)
        logits, cache = forward(self.engine.graphdef, state, tokens, jnp.zeros((rows,), jnp.int32), cache,
                                adapter_batch(bank, compressed, slots, clusters, sigma_ids))
        last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=True)
        return sample(last, *sampling)[0], cache

    @staticmethod
    def _insert_fn(cache, prefill_cache, row):
        """Copy the prefilled row 0 into decode row `row` of every layer's cache."""
        return jax.tree.map(
            lambda full, new: jax.lax.dynamic_update_slice_in_dim(full, new[:1], row, axis=0), cache, prefill_cache
        )

    def _decode_fn(self, state, cache, bank, compressed, tokens, positions, ids, sampling):
        """One token for every row: write its KV at its position, attend, sample the next token.

        ids = per-row (slots, clusters, Σ ids)."""
        logits, cache = forward(self.engine.graphdef, state, tokens[:, None], positions, cache,
                                adapter_batch(bank, compressed, *ids))
        return sample(logits[:, 0], *sampling), cache

    @staticmethod
    def _sampling(params: list[SamplingParams], steps: list[int]):
        """Per-row sampling arrays; a request without a seed draws from its id so rows never share a stream."""
        return (
            jnp.asarray([p.temperature for p in params], jnp.float32),
            jnp.asarray([p.top_p for p in params], jnp.float32),
            jnp.asarray([p.top_k for p in params], jnp.int32),
            row_keys(jnp.asarray([p.seed for p in params], jnp.int32), jnp.asarray(steps, jnp.int32)),
        )

    def submit(self, request: Request) -> None:
        if request.params.seed is None:
            request.params = SamplingParams(**{**request.params.__dict__, "seed": request.id})
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def adapters_in_use(self) -> set[str]:
        return {r.adapter for r in self.running.values() if r.adapter is not None}

    def _drop_cancelled(self) -> list[Request]:
        """Free the rows and queue places of cancelled requests (e.g. a client that disconnected)."""
        dropped = [r for r in [*self.running.values(), *self.waiting] if r.cancelled]
        for request in dropped:
            request.finish_reason = "abort"
        self.running = {row: r for row, r in self.running.items() if not r.cancelled}
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        return dropped

    def plan(self) -> StepPlan:
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
            except AdapterError:  # its files changed or vanished since registration: this request fails alone
                failed.append(request.id)
                continue
            row = free_rows.pop(0)
            taken[row] = request.adapter
            admit.append((row, request.id, slots[-1], clusters[-1], sigma_ids[-1]))
        rows = tuple(sorted(taken))
        slots, clusters, sigma_ids = self.engine.resolve([taken[i] for i in rows]) if rows else ((), (), ())
        return StepPlan(tuple(admit), tuple(slots), rows, tuple(clusters), tuple(sigma_ids), tuple(failed))

    def step(self) -> list[Request]:
        """Plan and run one step: prefill admissions, then one decode token for all rows; returns finished requests."""
        finished = self._drop_cancelled()
        plan = self.plan()
        waiting = {r.id: r for r in self.waiting}
        for request_id in plan.failed:
            request = waiting[request_id]
            self.waiting.remove(request)
            request.finish_reason = "error"
            finished.append(request)
        for row, request_id, *ids in plan.admit:
            request = waiting[request_id]
            self.waiting.remove(request)
            self._prefill_row(request, row, ids)
            if self._emit(request, self.tokens[row]):
                finished.append(request)
            else:
                self.running[row] = request
        decode_rows = [row for row in plan.decode_rows if row in self.running]
        if decode_rows:
            ids = np.zeros((3, self.rows), np.int32)
            for array, values in zip(ids, (plan.decode_slots, plan.decode_clusters, plan.decode_sigma_ids)):
                array[list(plan.decode_rows)] = values
            params = [self.running[i].params if i in self.running else _IDLE for i in range(self.rows)]
            steps = [len(self.running[i].output) if i in self.running else 0 for i in range(self.rows)]
            new, self.cache = self._decode(self.engine.state, self.cache, self.engine.pool.bank,
                                           self.engine.compressed_arrays, jnp.asarray(self.tokens),
                                           jnp.asarray(self.positions), tuple(jnp.asarray(a) for a in ids),
                                           self._sampling(params, steps))
            new = np.asarray(new)
            for row in decode_rows:
                request = self.running[row]
                self.tokens[row], self.positions[row] = new[row], self.positions[row] + 1
                if self._emit(request, int(new[row])):
                    del self.running[row]
                    finished.append(request)
        return finished

    def _prefill_row(self, request: Request, row: int, ids: list[int]) -> None:
        """Prefill a request into decode row `row` with its adapter's (slot, cluster, Σ id); record its first token."""
        length = len(request.prompt)
        padded = np.zeros((self._prefill_rows, prompt_bucket(length, self.max_seq_len)), np.int32)
        padded[0, :length] = request.prompt
        first, prefill_cache = self._prefill(self.engine.state, self.engine.pool.bank, self.engine.compressed_arrays,
                                             jnp.asarray(padded), jnp.int32(length),
                                             tuple(jnp.int32(i) for i in ids), self._sampling([request.params], [0]))
        self.cache = self._insert(self.cache, prefill_cache, jnp.int32(row))
        self.tokens[row], self.positions[row] = int(first), length

    def _emit(self, request: Request, token: int) -> bool:
        """Record a token, tell the listener, and return whether the request is now finished."""
        request.output.append(int(token))
        self.generated_tokens += 1
        params = request.params
        tokenizer = self.engine.tokenizer
        if request.output[-1] in params.stop_token_ids:
            request.finish_reason = "stop"
        elif params.stop and tokenizer is not None and any(s in tokenizer.decode(request.output) for s in params.stop):
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
