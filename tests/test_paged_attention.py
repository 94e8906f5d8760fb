"""Attention over a paged KV cache for ragged batches: the XLA version equals attention over each request's
contiguous keys, the Pallas kernel in interpret mode equals the XLA version, and the kernel lowers for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdlora_jax.kernels.paged_attention_triton import PagedAttentionConfig
from bdlora_jax.kernels.paged_attention_triton import paged_attention as kernel_paged_attention
from bdlora_jax.model.paged_attention import paged_attention, query_blocks

KV_HEADS, GROUPS, HEAD_DIM = 2, 4, 16
# (kv_len, q_len) per request: decode tokens, prompt chunks over cached pages, whole prompts, one padding request
REQUESTS = [(1, 1), (16, 16), (17, 3), (40, 1), (64, 30), (5, 0), (33, 33), (7, 2)]
PADDING_TOKENS = 3  # tokens past the last request's, as a bucketed step has


def _case(page_size, requests=REQUESTS, seed=0):
    """Operands with every request's pages scattered over the pool and garbage past each page table's end."""
    rng = np.random.default_rng(seed)
    kv_lens = np.array([kv for kv, _ in requests], np.int32)
    q_lens = np.array([q for _, q in requests], np.int32)
    needed = -(-kv_lens // page_size)
    num_pages = int(needed.sum()) + 3
    order = rng.permutation(num_pages)
    width = int(needed.max()) + 1
    page_tables = rng.integers(0, num_pages, (len(requests), width)).astype(np.int32)
    taken = 0
    for r, n in enumerate(needed):
        page_tables[r, :n] = order[taken:taken + n]
        taken += n
    k_pages = rng.standard_normal((num_pages, KV_HEADS, page_size, HEAD_DIM)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, KV_HEADS, page_size, HEAD_DIM)).astype(np.float32)
    q = rng.standard_normal((int(q_lens.sum()) + PADDING_TOKENS, KV_HEADS, GROUPS, HEAD_DIM)).astype(np.float32)
    return q, k_pages, v_pages, page_tables, kv_lens, q_lens


def _contiguous_attention(q, k_pages, v_pages, page_tables, kv_lens, q_lens, scale):
    """Per request, its keys laid out contiguously and each query against the keys up to its position (numpy)."""
    out = np.zeros(q.shape, np.float32)
    token = 0
    for r, (kv_len, q_len) in enumerate(zip(kv_lens, q_lens)):
        keys = np.concatenate(list(k_pages[page_tables[r]]), axis=1)[:, :kv_len]  # (kv_heads, kv_len, head_dim)
        values = np.concatenate(list(v_pages[page_tables[r]]), axis=1)[:, :kv_len]
        for i in range(q_len):
            position = kv_len - q_len + i
            scores = np.einsum("kgd,ktd->kgt", q[token], keys[:, :position + 1]) * scale
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            out[token] = np.einsum("kgt,ktd->kgd", probs, values[:, :position + 1])
            token += 1
    return out, token


@pytest.mark.parametrize("page_size,block", [(4, 1), (4, 8), (16, 16), (16, 4)])
def test_xla_paged_attention_equals_each_requests_contiguous_attention(page_size, block):
    operands = _case(page_size)
    scale = HEAD_DIM ** -0.5
    want, real = _contiguous_attention(*operands, scale)
    got = jax.jit(lambda *a: paged_attention(*a, scale=scale, block=block))(*map(jnp.asarray, operands))
    np.testing.assert_allclose(np.asarray(got)[:real], want[:real], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[real:], 0)  # padding tokens get zeros


def test_query_blocks_hold_each_requests_tokens_once_and_never_mix_requests():
    q_lens = jnp.asarray([3, 0, 17, 1, 16], jnp.int32)
    blocks = query_blocks(q_lens, 40, 8)
    assert blocks.request.shape == (-(-40 // 8) + 5 - 1,)
    starts = np.cumsum(q_lens) - q_lens
    covered = []
    for request, start, end in zip(*map(np.asarray, blocks)):
        if start < end:
            assert starts[request] <= start and end == starts[request] + q_lens[request]
            covered.extend(range(start, min(start + 8, end)))
    assert sorted(covered) == list(range(int(q_lens.sum())))
    assert query_blocks(q_lens, 40, 1).request.shape == (40,)


@pytest.mark.parametrize("block", [16, 32])
def test_kernel_in_interpret_mode_equals_the_xla_version_on_ragged_batches(block):
    operands = tuple(map(jnp.asarray, _case(16, seed=1)))
    scale = HEAD_DIM ** -0.5
    real = int(operands[5].sum())
    want = jax.jit(lambda *a: paged_attention(*a, scale=scale))(*operands)
    got = jax.jit(lambda *a: kernel_paged_attention(*a, scale=scale, config=PagedAttentionConfig(block=block),
                                                    interpret=True))(*operands)
    np.testing.assert_allclose(np.asarray(got)[:real], np.asarray(want)[:real], rtol=1e-5, atol=1e-5)


def test_kernel_lowers_to_one_triton_call_for_cuda_without_a_gpu():
    tokens, requests, pages, width = 256, 32, 512, 16
    args = (jax.ShapeDtypeStruct((tokens, 8, 4, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((pages, 8, 16, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((pages, 8, 16, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((requests, width), jnp.int32),
            jax.ShapeDtypeStruct((requests,), jnp.int32), jax.ShapeDtypeStruct((requests,), jnp.int32))
    fn = jax.jit(lambda *a: kernel_paged_attention(*a, scale=128 ** -0.5))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert 'name = "paged_attention"' in text


def test_bad_operands_name_the_operand_and_what_was_expected():
    q, k_pages, v_pages, page_tables, kv_lens, q_lens = map(jnp.asarray, _case(16))
    with pytest.raises(ValueError, match=r"k_pages has shape \(\d+, 3, 16, 16\); expected \(num_pages, 2, "):
        paged_attention(q, k_pages[:, :1].repeat(3, axis=1), v_pages, page_tables, kv_lens, q_lens, scale=1.0)
    with pytest.raises(ValueError, match=r"q_lens has shape \(7,\); expected \(8,\), one per request"):
        paged_attention(q, k_pages, v_pages, page_tables, kv_lens, q_lens[:7], scale=1.0)
    small = _case(8)
    with pytest.raises(ValueError, match="page_size=8: expected a power of two >= 16"):
        kernel_paged_attention(*map(jnp.asarray, small), scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="block=24: expected a power of two >= 16"):
        PagedAttentionConfig(block=24)
