"""Attention of a ragged batch of query tokens over a paged KV cache, in XLA: each query block reads only its
own request's pages (the CPU path, and the reference the Pallas kernel is tested against).

Layouts, for one layer on one device:
- q (T, kv_heads, groups, head_dim): the step's query tokens, each request's tokens contiguous, in request order;
- k_pages, v_pages (num_pages, kv_heads, page_size, head_dim): the layer's page pool;
- page_tables (R, pages_per_request) int32: each request's pages in token order (entries past its length unread);
- kv_lens (R,): each request's tokens in the cache, this step's included (they are written before attending);
- q_lens (R,): each request's query tokens this step; they are its last q_len positions, kv_len - q_len onwards.
A request with no query tokens is padding. A query at position p sees the keys at positions 0..p of its request,
so a decode token (q_len 1), a chunk of a prompt and a whole prompt are the same computation.

The tokens are cut into query blocks of `block` tokens of one request (`work_items`, as the LoRA prefill kernels
cut tokens into tiles of one adapter); each block gathers its request's page table's pages once. With `block` 1
each token is its own block and attends in place (no block bookkeeping): the fastest layout for steps of one token
per request (decode), where larger blocks would be one real row and padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..kernels.lora_triton import work_items


class QueryBlocks(NamedTuple):
    """Per query block: its request, its first token and the end of its request's tokens; the block holds tokens
    start..min(start + block, end) - 1 (start == end: an unused block)."""

    request: jax.Array
    start: jax.Array
    end: jax.Array


def query_blocks(q_lens: jax.Array, tokens: int, block: int) -> QueryBlocks:
    """The query blocks of a step of `tokens` tokens whose requests have q_lens tokens each, `block` at most a block.

    There are cdiv(tokens, block) + min(R, tokens) - 1 blocks (tokens when block is 1), enough for any q_lens."""
    return QueryBlocks(*work_items(q_lens.astype(jnp.int32), tokens, block))


def check_paged_operands(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_tables: jax.Array,
                         kv_lens: jax.Array, q_lens: jax.Array) -> None:
    """Raise a ValueError naming the first operand whose shape does not fit the layouts above."""
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}; expected (tokens, kv_heads, groups, head_dim)")
    _, kv_heads, _, head_dim = q.shape
    for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
        if pages.ndim != 4 or pages.shape[1] != kv_heads or pages.shape[3] != head_dim:
            raise ValueError(f"{name} has shape {pages.shape}; expected (num_pages, {kv_heads}, page_size, "
                             f"{head_dim})")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"v_pages has shape {v_pages.shape}; expected k_pages' shape {k_pages.shape}")
    if page_tables.ndim != 2:
        raise ValueError(f"page_tables has shape {page_tables.shape}; expected (requests, pages_per_request)")
    for name, lens in (("kv_lens", kv_lens), ("q_lens", q_lens)):
        if lens.shape != page_tables.shape[:1]:
            raise ValueError(f"{name} has shape {lens.shape}; expected ({page_tables.shape[0]},), one per request")


def request_keys(pages: jax.Array, tables: jax.Array) -> jax.Array:
    """(n, kv_heads, pages_per_request·page_size, head_dim): the pages of each of n page tables, in token order."""
    gathered = pages[tables]  # (n, pages_per_request, kv_heads, page_size, head_dim)
    n, _, kv_heads, _, head_dim = gathered.shape
    return gathered.transpose(0, 2, 1, 3, 4).reshape(n, kv_heads, -1, head_dim)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_tables: jax.Array,
                    kv_lens: jax.Array, q_lens: jax.Array, *, scale: float, block: int = 16) -> jax.Array:
    """softmax(q·kᵀ·scale)·v of every query token over its request's keys up to its own position (layouts above),
    (T, kv_heads, groups, head_dim) float32; `block` query tokens of one request share one gather of its pages."""
    check_paged_operands(q, k_pages, v_pages, page_tables, kv_lens, q_lens)
    if block == 1:
        return _attention_per_token(q, k_pages, v_pages, page_tables, kv_lens, q_lens, scale)
    tokens, kv_heads, groups, head_dim = q.shape
    blocks = query_blocks(q_lens, tokens, block)
    query_starts = jnp.cumsum(q_lens) - q_lens
    rows = blocks.start[:, None] + jnp.arange(block)  # (blocks, block) token index of each row
    row_ok = rows < blocks.end[:, None]
    kv_len, q_len = kv_lens[blocks.request], q_lens[blocks.request]
    position = (kv_len - q_len - query_starts[blocks.request])[:, None] + rows  # of each row's query
    queries = q[jnp.minimum(rows, tokens - 1)]  # (blocks, block, kv_heads, groups, head_dim)
    keys, values = (request_keys(pages, page_tables[blocks.request]) for pages in (k_pages, v_pages))
    key_position = jnp.arange(keys.shape[2])
    # rows past a block's end see every key (never an all-masked softmax) and are dropped below
    visible = (key_position[None, None, :] <= position[:, :, None]) | ~row_ok[:, :, None]
    scores = jnp.einsum("wqkgd,wktd->wkgqt", queries, keys, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("wkgqt,wktd->wqkgd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    destination = jnp.where(row_ok, rows, tokens).reshape(-1)
    flat = out.reshape(-1, kv_heads, groups, head_dim)
    return jnp.zeros((tokens, kv_heads, groups, head_dim), jnp.float32).at[destination].set(flat, mode="drop")


def _attention_per_token(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_tables: jax.Array,
                         kv_lens: jax.Array, q_lens: jax.Array, scale: float) -> jax.Array:
    """paged_attention with blocks of one token: each token gathers its request's pages and attends in place."""
    tokens = q.shape[0]
    ends = jnp.cumsum(q_lens)
    token = jnp.arange(tokens)
    request = jnp.minimum(jnp.searchsorted(ends, token, side="right"), q_lens.shape[0] - 1)
    used = token < ends[-1]  # tokens past the requests' are padding
    position = kv_lens[request] - ends[request] + token  # kv_len - q_len + the token's index in its request
    keys, values = (request_keys(pages, page_tables[request]) for pages in (k_pages, v_pages))
    # padding tokens see every key (never an all-masked softmax) and are zeroed below
    visible = (jnp.arange(keys.shape[2]) <= position[:, None]) | ~used[:, None]
    scores = jnp.einsum("tkgd,tksd->tkgs", q, keys, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("tkgs,tksd->tkgd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return jnp.where(used[:, None, None, None], out, 0.0)
