"""The Pallas paged-attention kernel on a mesh: a shard_map over kv heads, since a Pallas call is one device's code.

Pages are split by kv heads (sharding.PAGE_AXES), so each device runs the kernel on its own kv heads' queries and
pages and no collective is needed. Where the kv heads do not divide the model axis, the pages are replicated (the
plan's fallback) and every device runs all heads. Along the data axis the step's tokens are not split: a request's
tokens and pages are needed whole by whichever device attends for it.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from ..kernels.paged_attention_triton import PagedAttentionConfig
from ..kernels.paged_attention_triton import paged_attention as kernel_paged_attention
from ..sharding import PAGE_AXES, ShardingPlan


def sharded_paged_attention(plan: ShardingPlan, q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            page_tables: jax.Array, kv_lens: jax.Array, q_lens: jax.Array, *, scale: float,
                            interpret: bool = False, config: PagedAttentionConfig | None = None) -> jax.Array:
    """model.paged_attention.paged_attention's result (T, kv_heads, groups, head_dim) float32, computed by the Pallas
    kernel on each device's kv heads (interpret=True runs it on any backend)."""
    spec = plan.spec(PAGE_AXES)  # q (tokens, kv_heads, groups, head_dim) splits as the pages do
    replicated = PartitionSpec()

    def local(q, k_pages, v_pages, page_tables, kv_lens, q_lens):
        return kernel_paged_attention(q, k_pages, v_pages, page_tables, kv_lens, q_lens, scale=scale, config=config,
                                      interpret=interpret)

    return jax.shard_map(local, mesh=plan.mesh, in_specs=(spec, spec, spec, *[replicated] * 3), out_specs=spec,
                         check_vma=False)(q, k_pages, v_pages, page_tables, kv_lens, q_lens)
