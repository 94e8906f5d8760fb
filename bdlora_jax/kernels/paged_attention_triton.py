"""A Pallas Triton GPU kernel for attention of a ragged batch of query tokens over a paged KV cache.

Same operands and result as the XLA version, `model/paged_attention.py` (its reference in the tests). One program
owns one query block (`block` tokens of one request, `query_blocks`) and one query head: it loads the block's
queries once, then walks its request's pages in order up to the block's last position, one page of keys and
values at a time, with an online softmax in float32 (running maximum, running sum, rescaled accumulator), so the
scores of a whole request never exist at once and no page past the block's last position is read. Keys after a
row's own position are masked; rows past the block's end are masked on load and store. Unused blocks return at once.

Triton's dot needs tile sides of at least 16 and every tile side a power of two: block, page_size and head_dim
must be. `pallas_call` gets Triton's CompilerParams (the backend choice, as for the LoRA kernels); interpret=True
runs the same kernel on any backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..model.paged_attention import check_paged_operands, query_blocks
from .lora_triton import MIN_BLOCK

NO_SCORE = -1e30  # the running maximum before any key: finite, so a rescale never computes inf - inf


@dataclass(frozen=True)
class PagedAttentionConfig:
    """Query tokens per program, and Triton's warps and software-pipelining stages."""

    block: int = 16
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        _power_of_two_tile("block", self.block)
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps={self.num_warps}, num_stages={self.num_stages}: expected positive integers")

    def compiler_params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _power_of_two_tile(name: str, value: int) -> None:
    if value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"{name}={value}: expected a power of two >= {MIN_BLOCK} (a Triton tile dimension)")


def _kernel(request_ref, start_ref, end_ref, query_start_ref, q_lens_ref, kv_lens_ref, page_tables_ref, q_ref,
            k_pages_ref, v_pages_ref, o_ref, *, groups: int, block: int, page_size: int, scale: float):
    w, head = pl.program_id(0), pl.program_id(1)
    kv_head, group = head // groups, head % groups
    request, start, end = request_ref[w], start_ref[w], end_ref[w]

    @pl.when(start < end)
    def _():
        rows = start + jnp.arange(block)
        row_ok = rows < end
        first_position = kv_lens_ref[request] - q_lens_ref[request] - query_start_ref[request]
        position = first_position + rows
        queries = plgpu.load(q_ref.at[pl.ds(start, block), kv_head, group, :], mask=row_ok[:, None], other=0)
        pages = pl.cdiv(first_position + jnp.minimum(start + block, end), page_size)  # to the block's last position

        def step(p, carry):
            running_max, running_sum, acc = carry
            page = page_tables_ref[request, p]
            keys = plgpu.load(k_pages_ref.at[page, kv_head, :, :])
            values = plgpu.load(v_pages_ref.at[page, kv_head, :, :])
            scores = plgpu.dot(queries, keys, trans_b=True).astype(jnp.float32) * scale
            key_position = p * page_size + jnp.arange(page_size)
            scores = jnp.where(key_position[None, :] <= position[:, None], scores, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
            rescale = jnp.exp(running_max - new_max)
            probs = jnp.exp(scores - new_max[:, None])
            acc = acc * rescale[:, None] + plgpu.dot(probs.astype(values.dtype), values).astype(jnp.float32)
            return new_max, running_sum * rescale + jnp.sum(probs, axis=1), acc

        head_dim = queries.shape[1]
        init = (jnp.full((block,), NO_SCORE, jnp.float32), jnp.zeros((block,), jnp.float32),
                jnp.zeros((block, head_dim), jnp.float32))
        _, running_sum, acc = jax.lax.fori_loop(0, pages, step, init)
        out = acc / jnp.where(row_ok, running_sum, 1.0)[:, None]
        plgpu.store(o_ref.at[pl.ds(start, block), kv_head, group, :], out, mask=row_ok[:, None])


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_tables: jax.Array,
                    kv_lens: jax.Array, q_lens: jax.Array, *, scale: float,
                    config: PagedAttentionConfig | None = None, interpret: bool = False) -> jax.Array:
    """model.paged_attention.paged_attention as one Pallas call: (T, kv_heads, groups, head_dim) float32."""
    check_paged_operands(q, k_pages, v_pages, page_tables, kv_lens, q_lens)
    cfg = config or PagedAttentionConfig()
    tokens, kv_heads, groups, head_dim = q.shape
    page_size = k_pages.shape[2]
    _power_of_two_tile("page_size", page_size)
    _power_of_two_tile("head_dim", head_dim)
    blocks = query_blocks(q_lens, tokens, cfg.block)
    q_lens = q_lens.astype(jnp.int32)
    query_starts = jnp.cumsum(q_lens) - q_lens
    kernel = partial(_kernel, groups=groups, block=cfg.block, page_size=page_size, scale=scale)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        grid=(blocks.request.shape[0], kv_heads * groups),
        compiler_params=cfg.compiler_params(),
        interpret=interpret,
        name="paged_attention",
    )(blocks.request, blocks.start, blocks.end, query_starts, q_lens, kv_lens.astype(jnp.int32),
      page_tables.astype(jnp.int32), q, k_pages, v_pages)
