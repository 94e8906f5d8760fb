"""Continuous batching over a paged KV cache: every step is one ragged batch of tokens under a token budget.

Each running request holds a decode row (its page-table row and its penalty state) and the pages its tokens fill.
A step feeds every running request what it still needs, oldest first: one token when it decodes, the next chunk of
its prompt while it prefills, so prompt chunks ride along with decode tokens instead of stopping them; what is
left of the budget admits waiting requests. A request whose tokens are all in the cache after the step samples its
next token from its last token's logits. When the pool has no page for a request's tokens, the newest running
request is preempted: its pages go back to the pool and it waits at the front of the queue, to recompute its prompt
and what it has generated when it is admitted again (its output so far is kept, so it continues as it would have).
Full pages are kept for reuse by prefix (engine/page_pool.py): an admitted request starts after the longest run of
its full pages that an earlier request of the same adapter registration computed, and registers its own as they fill.
Shapes come from a few token-count buckets and the adapter group counts, so steady state compiles nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import jax
import numpy as np

from ..errors import AdapterError, PoolFullError
from ..model.llama import RaggedBatch, init_pages, ragged_forward
from .generator import Generator, Request, adapter_batch, bucket, geometric_sizes
from .page_memory import pages_for_memory
from .page_pool import PagePool, page_keys
from .penalties import prompt_mask, reset_rows_jit
from .sampler import first_argmax

QUERY_BLOCK = 16  # query tokens of one request per gather of its pages (model/paged_attention.py)
MIN_STEP_TOKENS = 8  # the smallest token bucket of a step
MIN_TABLE_WIDTH = 4  # the narrowest page-table bucket: a step's attention reads at most this many pages a request


@dataclass
class Progress:
    """A running request's place in the cache: how many of its tokens (prompt, then output) are in it, its pages in
    token order, the prefix keys of its full pages so far, and its adapter's identity (what the keys start from)."""

    identity: str
    computed: int = 0
    pages: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)


def known_tokens(request: Request) -> list[int]:
    """Every token of a request so far: its prompt, then what it has generated."""
    return request.prompt + request.output


class PagedGenerator(Generator):
    """The Generator's requests, sampling and penalties over a paged KV cache and ragged steps (module docstring);
    the contiguous cache's prefill and decode calls are replaced by schedule, step and warm_up here."""

    def _init_kv_cache(self) -> None:
        """The page pool of every layer, its host-side bookkeeping and the jitted ragged step."""
        config, plan = self.engine.config, self.engine.plan
        data = plan.data_size
        self.page_size = config.page_size
        self.pages_per_row = -(-self.max_seq_len // self.page_size)
        num_pages = config.num_pages or -(-self.rows * self.max_seq_len // self.page_size)
        if config.kv_cache_memory is not None:
            num_pages = pages_for_memory(config.kv_cache_memory, self.engine.model_config, plan, self.page_size,
                                         self._cache_dtype)
            if num_pages * self.page_size < self.max_seq_len:
                raise ValueError(f"kv_cache_memory={config.kv_cache_memory}: holds {num_pages} pages of "
                                 f"{self.page_size} tokens, too few for one request of max_seq_len="
                                 f"{self.max_seq_len} tokens")
        self.page_pool = PagePool(num_pages, self.page_size)
        self.page_cache = init_pages(self.engine.model_config, plan, num_pages, self.page_size, self._cache_dtype)
        budget = -(-config.max_num_batched_tokens // data) * data
        self.step_sizes = geometric_sizes(min(budget, -(-MIN_STEP_TOKENS // data) * data), budget, 4)
        # a step's page tables are as wide as its longest request needs, bucketed: attention reads real lengths
        self.table_widths = geometric_sizes(min(MIN_TABLE_WIDTH, self.pages_per_row), self.pages_per_row, 4)
        self.progress: dict[int, Progress] = {}
        self.prefix_queried_tokens = 0  # tokens of admitted requests' full pages looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of those, tokens found there (not computed again)
        # steps of one token per request (decode) attend per token; only sizes up to the rows' bucket have them
        self.decode_sizes = [size for size in self.step_sizes if size <= bucket(self.rows, self.step_sizes)]
        self._step_jit = jax.jit(self._step_fn, donate_argnums=(1,), static_argnames=("query_block",))
        self._step_base_jit = jax.jit(self._step_base_fn, donate_argnums=(1,), static_argnames=("query_block",))

    def _step_fn(self, state, pages, bank, compressed, tokens, batch, ids, groups, last, query_block):
        """One ragged step; returns each row's last-token logits (rows, vocab), their argmax and the new pages."""
        rows, pages = ragged_forward(self.engine.graphdef, state, tokens, pages, batch,
                                     adapter_batch(bank, compressed, *ids, groups), query_block, last)
        return rows, first_argmax(rows), pages

    def _step_base_fn(self, state, pages, tokens, batch, last, query_block):
        """`_step_fn` for a step in which no token uses an adapter: the base model alone."""
        rows, pages = ragged_forward(self.engine.graphdef, state, tokens, pages, batch, None, query_block, last)
        return rows, first_argmax(rows), pages

    @property
    def pages_used(self) -> int:
        return self.page_pool.used

    def kv_pages(self) -> tuple[int, int]:
        return self.page_pool.used, self.page_pool.num_pages

    def prefix_cache_tokens(self) -> tuple[int, int]:
        return self.prefix_queried_tokens, self.prefix_hit_tokens

    def _release(self, row: int) -> None:
        """End a row's request: its row and pages are free."""
        del self.running[row]
        self.page_pool.release(self.progress.pop(row).pages)

    def _preempt(self, row: int) -> None:
        """Free a running request's row and pages and queue it first, to recompute its tokens when readmitted."""
        request = self.running[row]
        self._release(row)
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _reserve(self, row: int, tokens: int) -> bool:
        """Pages for `tokens` tokens of a row's request, preempting the newest running requests while the pool is
        short; False when the row's own request was the newest and is preempted."""
        while not self.page_pool.grow(self.progress[row].pages, tokens):
            newest = next(reversed(self.running))
            self._preempt(newest)
            if newest == row:
                return False
        return True

    def drop_cancelled(self) -> list[Request]:
        """Generator.drop_cancelled, returning the running ones' pages to the pool."""
        for row in [row for row, request in self.running.items() if request.cancelled]:
            self.page_pool.release(self.progress.pop(row).pages)
        return super().drop_cancelled()

    def schedule(self) -> tuple[dict[int, int], list[int], list[Request]]:
        """This step's (tokens to feed per row, rows admitted now, requests that fail): running requests first,
        oldest first, then waiting ones in arrival order while rows, adapter slots, budget and pages allow."""
        budget = self.step_sizes[-1]
        feeds: dict[int, int] = {}
        for row in list(self.running):
            if row not in self.running or budget == 0:  # preempted for an older request's pages
                continue
            n = min(len(known_tokens(self.running[row])) - self.progress[row].computed, budget)
            if self._reserve(row, self.progress[row].computed + n):
                feeds[row], budget = n, budget - n
        admitted, failed = [], []
        free_rows = [row for row in range(self.rows) if row not in self.running]
        while self.waiting and budget > 0 and free_rows:
            request = self.waiting[0]
            error = self._admission_error(request)
            if isinstance(error, PoolFullError):
                break
            if error is not None:
                self.waiting.popleft()
                request.finish_reason, request.error = "error", error
                failed.append(request)
                continue
            progress = self._cached_prefix(request)
            n = min(len(known_tokens(request)) - progress.computed, budget)
            if not self.page_pool.grow(progress.pages, progress.computed + n):
                self.page_pool.release(progress.pages)
                break
            self.prefix_queried_tokens += (len(known_tokens(request)) - 1) // self.page_size * self.page_size
            self.prefix_hit_tokens += progress.computed
            row = free_rows.pop(0)
            self.waiting.popleft()
            self.running[row], self.progress[row] = request, progress
            feeds[row], budget = n, budget - n
            admitted.append(row)
        return feeds, admitted, failed

    def _cached_prefix(self, request: Request) -> Progress:
        """A waiting request's Progress from the prefix cache: the longest run of its full pages found there, held
        now. Its last token is never among them, since computing it gives the logits its next token comes from."""
        identity = self.engine.adapter_identity(request.adapter)
        known = known_tokens(request)
        keys = page_keys(identity, known, self.page_size, (len(known) - 1) // self.page_size)
        pages = self.page_pool.match(keys)
        return Progress(identity, len(pages) * self.page_size, pages, keys[:len(pages)])

    def _register_full_pages(self, row: int) -> None:
        """Make a row's newly filled pages reusable by prefix."""
        progress, known = self.progress[row], known_tokens(self.running[row])
        have, full = len(progress.keys), progress.computed // self.page_size
        if full <= have:
            return
        keys = page_keys(progress.identity, known, self.page_size, full - have, start=have,
                         previous=progress.keys[-1] if progress.keys else None)
        for page, key in zip(progress.pages[have:full], keys):
            self.page_pool.register(page, key)
        progress.keys.extend(keys)

    def _admission_error(self, request: Request) -> Exception | None:
        """Why a waiting request cannot be admitted now: PoolFullError (its adapter has no slot yet: it waits), or
        an AdapterError that fails it alone (its adapter's files changed or vanished since registration). The pool
        holds at least one request of max_seq_len tokens (EngineConfig), so no request needs more than all of it."""
        try:
            self.engine.resolve([*self.adapters_in_use(), request.adapter])
        except (PoolFullError, AdapterError) as e:
            return e
        return None

    def step(self) -> list[Request]:
        """Plan and run one ragged step; returns the requests that finished."""
        finished = self.drop_cancelled()
        feeds, admitted, failed = self.schedule()
        finished += failed
        self._start_histories(admitted)
        if not feeds:
            return finished
        arrays, sampling = self._step_arrays(feeds)
        logits, greedy = self._run_step(*arrays)
        requests = [self.running[row] if row in sampling else None for row in range(self.rows)]
        state_rows = np.array([row if row in sampling else self.rows for row in range(self.rows)], np.int32)
        new, logprobs = self._sample_rows(logits, requests, state_rows, greedy=greedy)
        for row, n in feeds.items():
            self.progress[row].computed += n
            self._register_full_pages(row)
        for row in sampling:
            request = self.running[row]
            if self._emit(request, int(new[row]), self._logprob(request, logprobs, row, new[row])):
                self._release(row)
                finished.append(request)
        return finished

    def _start_histories(self, rows: list[int]) -> None:
        """Set the penalty state of newly admitted rows whose requests read it: the prompt's tokens seen, and the
        tokens already generated by a recomputed request counted."""
        rows = [row for row in rows if self.running[row].params.adjusts_logits]
        if not rows:
            return
        vocab = self.seen.shape[1]
        state_rows = np.full(self.rows, self.rows, np.int32)
        state_rows[:len(rows)] = rows
        generated = np.zeros((self.rows, vocab), np.int32)
        for i, row in enumerate(rows):
            np.add.at(generated[i], self.running[row].output, 1)
        seen = prompt_mask([self.running[row].prompt for row in rows], self.rows, vocab)
        self.seen, self.counts = reset_rows_jit(self.seen, self.counts, state_rows, seen, generated)

    def _step_arrays(self, feeds: dict[int, int]) -> tuple[tuple, list[int]]:
        """((tokens, per-token (slots, clusters, Σ ids), RaggedBatch, each row's last token index, query block), the
        rows that sample this step) for feeding `feeds` tokens per row, rows in order; the query block is 1 when
        every row feeds one token (a decode step), else QUERY_BLOCK."""
        rows = sorted(feeds)
        size = bucket(sum(feeds.values()), self.step_sizes)
        tokens, ids = np.zeros(size, np.int32), np.zeros((3, size), np.int32)
        q_lens, kv_lens, last = (np.zeros(self.rows, np.int32) for _ in range(3))
        width = bucket(max(len(self.progress[row].pages) for row in rows), self.table_widths)
        page_tables = np.zeros((self.rows, width), np.int32)
        resolved = self.engine.resolve([self.running[row].adapter for row in rows])
        sampling, offset = [], 0
        for row, *row_ids in zip(rows, *resolved):
            request, progress, n = self.running[row], self.progress[row], feeds[row]
            known = known_tokens(request)
            tokens[offset:offset + n] = known[progress.computed:progress.computed + n]
            ids[:, offset:offset + n] = np.asarray(row_ids, np.int32)[:, None]
            q_lens[row], kv_lens[row], last[row] = n, progress.computed + n, offset + n - 1
            page_tables[row, :len(progress.pages)] = progress.pages
            if progress.computed + n == len(known):
                sampling.append(row)
            offset += n
        query_block = 1 if max(feeds.values()) == 1 else QUERY_BLOCK
        return (tokens, ids, RaggedBatch(page_tables, kv_lens, q_lens), last, query_block), sampling

    def _run_step(self, tokens, ids, batch, last, query_block) -> tuple[jax.Array, jax.Array]:
        """The jitted step on the device (the base-model one when no token uses an adapter)."""
        if not ids[0].any() and not ids[2].any():
            logits, greedy, self.page_cache = self._step_base_jit(self.engine.state, self.page_cache, tokens, batch, last,
                                                                query_block=query_block)
        else:
            logits, greedy, self.page_cache = self._step_jit(self.engine.state, self.page_cache, self.engine.pool.bank,
                                                           self.engine.compressed_arrays, tokens, batch, ids,
                                                           self.groups(ids[0]), last, query_block=query_block)
        return logits, greedy

    def warm_up(self) -> None:
        """Compile every step size and page-table width with and without adapters (each group count), in both query
        blocks where decode steps can have that size, each with every sampler variant, and the penalty-state reset,
        so serving compiles nothing new; pages and histories are left as they were (no token of a warm-up step
        belongs to a request, so every write is dropped)."""
        past_end = np.full(self.rows, self.rows, np.int32)
        vocab = self.seen.shape[1]  # the reset first: the histories it returns are the ones the sampler then reads
        self.seen, self.counts = reset_rows_jit(self.seen, self.counts, past_end, np.zeros((self.rows, vocab), bool),
                                                np.zeros((self.rows, vocab), np.int32))
        for size, width, groups in itertools.product(self.step_sizes, self.table_widths, [0, *self.group_sizes]):
            if groups > bucket(min(size, self.group_sizes[-1]), self.group_sizes):
                continue  # more distinct adapters than a step of `size` tokens can hold
            ids = np.zeros((3, size), np.int32)
            ids[0, :min(groups, size)] = np.arange(1, min(groups, size) + 1)
            idle = RaggedBatch(np.zeros((self.rows, width), np.int32), *np.zeros((2, self.rows), np.int32))
            for query_block in [QUERY_BLOCK, 1] if size in self.decode_sizes else [QUERY_BLOCK]:
                logits, _ = self._run_step(np.zeros(size, np.int32), ids, idle, np.zeros(self.rows, np.int32),
                                           query_block)
            self._warm_sampler(logits, past_end, prompts=None)
