"""Ragged steps over a paged KV cache (decode tokens beside prompt chunks in one step, each token with its own
adapter: none, dense LoRA, BD-LoRA) give the contiguous cache's logits on every mesh × strategy, and the same logits
in any chunking as one-shot prefill; the Pallas paged-attention kernel (interpret mode) in the ragged step gives the
XLA attention's logits and lowers for CUDA to one Triton call per layer."""

import dataclasses
import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MESHES

from bdlora_jax import Engine
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.bench.triton_lowering import triton_kernels
from bdlora_jax.config import ModelConfig
from bdlora_jax.mesh import make_mesh
from bdlora_jax.model.llama import (
    AdapterBatch,
    RaggedBatch,
    abstract_model,
    forward,
    init_cache,
    init_model,
    init_pages,
    ragged_forward,
)
from bdlora_jax.sharding import STRATEGIES, make_plan

LENGTH = 12
PAGE_SIZE = 4
NAMES = [None, "lora", "bd", "bd", "lora"]
# tokens each request feeds per step (0: idle that step); every row sums to LENGTH
CHUNKS = [[5, 4, 1, 1, 1],   # a prompt in two chunks, then decode tokens
          [1, 1, 1, 1, 8],   # decode tokens from the start, then the rest in one chunk
          [12, 0, 0, 0, 0],  # one whole prompt, then idle
          [3, 3, 3, 2, 1],
          [0, 6, 0, 6, 0]]   # idle steps between chunks


ROWS = 8  # the contiguous cache's batch: the requests and padding rows, a multiple of the data axis
CHUNKINGS_ON = [("1x1", "bdlora", 1), ("2x4", "slora", 16)]
QUERY_BLOCKS = (16, 4, 1)  # attention in blocks of 16 or 4 query tokens, or per token as decode steps attend


def _engine(hf_dir, mesh: str, strategy: str) -> Engine:
    eng = Engine.from_pretrained(hf_dir / "model", mesh=mesh, strategy=strategy, max_loras=3, max_lora_rank=32)
    eng.add_adapter("lora", hf_dir / "adapters" / "lora_rs_r4_qv")
    eng.add_adapter("bd", random_adapter(eng.model_config, "bd", rank=8, nblocks=8, seed=4))
    return eng


def _sequences(eng: Engine) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(0, eng.model_config.vocab_size, LENGTH))) for _ in NAMES]


def _ragged_paged_steps(eng: Engine, sequences: list[list[int]], chunks: list[list[int]] = CHUNKS,
                        query_block: int = 16, logits_at: np.ndarray | None = None):
    """Feed chunks (per request, tokens per step) through ragged steps over shuffled pages, every step padded to
    one size (one compilation); yield (step, q_lens, positions fed before, logits of the step's real tokens in
    request order, or with logits_at those of the tokens at those indices only)."""
    slots = eng.pool.slots_for(NAMES)
    per_request = -(-LENGTH // PAGE_SIZE)
    num_pages = len(NAMES) * per_request + 2
    page_tables = np.random.default_rng(2).permutation(num_pages)[:len(NAMES) * per_request].reshape(
        len(NAMES), per_request)
    pages = init_pages(eng.model_config, eng.plan, num_pages, PAGE_SIZE)
    step = jax.jit(partial(ragged_forward, eng.graphdef), donate_argnums=(2,), static_argnames="query_block")
    tokens_fed = np.zeros(len(NAMES), np.int32)
    most = max(sum(per_step) for per_step in zip(*chunks))
    padded = -(-(most + 1) // 8) * 8  # at least one padding token, a multiple of the data axis
    for s in range(len(chunks[0])):
        q_lens = np.array([per_step[s] for per_step in chunks], np.int32)
        tokens = [sequences[r][p] for r, n in enumerate(q_lens) for p in range(tokens_fed[r], tokens_fed[r] + n)]
        token_slots = [slots[r] for r, n in enumerate(q_lens) for _ in range(n)]
        real = len(tokens)
        before = tokens_fed.copy()
        tokens_fed += q_lens
        batch = RaggedBatch(jnp.asarray(page_tables, jnp.int32), jnp.asarray(tokens_fed), jnp.asarray(q_lens))
        adapters = AdapterBatch(eng.pool.bank, jnp.asarray(token_slots + [0] * (padded - real), jnp.int32))
        logits, pages = step(eng.state, jnp.asarray(tokens + [0] * (padded - real), jnp.int32), pages, batch, adapters,
                             query_block=query_block, logits_at=logits_at)
        yield s, q_lens, before, np.asarray(logits) if logits_at is not None else np.asarray(logits)[:real]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_paged_attention_equals_the_contiguous_cache_fed_the_same_chunks(hf_dir, mesh, strategy):
    eng = _engine(hf_dir, mesh, strategy)
    sequences = _sequences(eng)
    cache = init_cache(eng.model_config, eng.plan, ROWS, 2 * LENGTH)
    contiguous = jax.jit(partial(forward, eng.graphdef), donate_argnums=(3,))
    row_slots = jnp.asarray(eng.pool.slots_for(NAMES + [None] * (ROWS - len(NAMES))), jnp.int32)
    query_block = QUERY_BLOCKS[(MESHES.index(mesh) * len(STRATEGIES) + STRATEGIES.index(strategy)) % 3]
    for s, q_lens, before, got in _ragged_paged_steps(eng, sequences, query_block=query_block):
        want = {}
        for n in sorted(set(q_lens.tolist()) - {0}):  # one contiguous call per chunk length in this step
            tokens = np.zeros((ROWS, LENGTH), np.int32)  # one shape: past a chunk, padding the causal mask hides
            start = np.zeros(ROWS, np.int32)  # every row writes past its real tokens; later chunks overwrite that
            for r, q in enumerate(q_lens):
                start[r] = before[r] if q == n else before[r] + q
                if q == n:
                    tokens[r, :n] = sequences[r][before[r]:before[r] + n]
            logits, cache = contiguous(eng.state, jnp.asarray(tokens), jnp.asarray(start), cache,
                                       AdapterBatch(eng.pool.bank, row_slots))
            want.update({r: np.asarray(logits)[r, :n] for r, q in enumerate(q_lens) if q == n})
        expected = np.concatenate([want[r] for r, q in enumerate(q_lens) if q])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"step {s}")


@pytest.mark.parametrize("mesh,strategy,query_block", CHUNKINGS_ON)
def test_ragged_paged_steps_in_any_chunking_equal_one_shot_prefill(hf_dir, mesh, strategy, query_block):
    eng = _engine(hf_dir, mesh, strategy)
    sequences = _sequences(eng)
    [(_, _, _, one_shot)] = _ragged_paged_steps(eng, sequences, [[LENGTH]] * len(NAMES))
    full = one_shot.reshape(len(NAMES), LENGTH, -1)
    for s, q_lens, before, got in _ragged_paged_steps(eng, sequences, query_block=query_block):
        expected = np.stack([full[r][p] for r, q in enumerate(q_lens) for p in range(before[r], before[r] + q)])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"step {s}")


@pytest.mark.parametrize("mesh,strategy", [(mesh, strategy) for mesh, strategy, _ in CHUNKINGS_ON])
def test_logits_at_gives_the_full_logits_at_those_positions(hf_dir, mesh, strategy):
    eng = _engine(hf_dir, mesh, strategy)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, eng.model_config.vocab_size, (ROWS, LENGTH)), jnp.int32)
    start = jnp.zeros(ROWS, jnp.int32)
    slots = jnp.asarray(eng.pool.slots_for((NAMES * 2)[:ROWS]), jnp.int32)  # loads them: the bank changes
    adapters = AdapterBatch(eng.pool.bank, slots)
    at = jnp.asarray(rng.integers(0, LENGTH, ROWS), jnp.int32)
    full, _ = jax.jit(partial(forward, eng.graphdef))(eng.state, tokens, start, None, adapters)
    last, _ = jax.jit(partial(forward, eng.graphdef))(eng.state, tokens, start, None, adapters, at)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full)[np.arange(ROWS), np.asarray(at)], atol=1e-5, rtol=0)
    [(_, q_lens, _, ragged_full)] = _ragged_paged_steps(eng, _sequences(eng), [[LENGTH]] * len(NAMES))
    ends = np.cumsum(q_lens) - 1
    [(_, _, _, ragged_last)] = _ragged_paged_steps(eng, _sequences(eng), [[LENGTH]] * len(NAMES), logits_at=ends)
    np.testing.assert_allclose(ragged_last, ragged_full[ends], atol=1e-5, rtol=0)


def _lm_head_outputs(hlo: str) -> list[int]:
    """Elements each LM-head dot of a compiled module writes (its einsum names it in the dot's metadata)."""
    shapes = re.findall(r"= f32\[([\d,]+)\][^=]*? dot\(.*bsd,dv->bsv", hlo)
    return [math.prod(int(d) for d in shape.split(",")) for shape in shapes]


def test_logits_at_multiplies_the_lm_head_on_those_positions_only(hf_dir):
    eng = _engine(hf_dir, "1x1", "bdlora")
    tokens, start, vocab = jnp.zeros((ROWS, LENGTH), jnp.int32), jnp.zeros(ROWS, jnp.int32), eng.model_config.vocab_size
    step = jax.jit(partial(forward, eng.graphdef))
    assert _lm_head_outputs(step.lower(eng.state, tokens, start).compile().as_text()) == [ROWS * LENGTH * vocab]
    at = jnp.zeros(ROWS, jnp.int32)
    assert _lm_head_outputs(step.lower(eng.state, tokens, start, None, None, at).compile().as_text()) == [ROWS * vocab]


KERNEL_CONFIG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8,
                            num_kv_heads=2, head_dim=16)  # Triton tiles: head_dim and page_size at least 16


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1x1", "1x2", "1x8"])  # kv heads split on 1x2, replicated on 1x8
def test_the_pallas_kernel_in_the_ragged_step_equals_the_xla_attention(mesh):
    plan = make_plan(make_mesh(mesh), "replicated", KERNEL_CONFIG)
    page_size, q_lens, kv_lens = 16, np.array([20, 1, 1, 6], np.int32), np.array([20, 33, 17, 40], np.int32)
    tables = np.arange(12, dtype=np.int32).reshape(4, 3)
    batch = RaggedBatch(jnp.asarray(tables), jnp.asarray(kv_lens), jnp.asarray(q_lens))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, 32), jnp.int32)  # 28 real, 4 padding
    graphdef, state = init_model(KERNEL_CONFIG, plan)
    pages = jax.tree.map(lambda p: p + 0.5, init_pages(KERNEL_CONFIG, plan, 12, page_size))  # earlier tokens' KV
    want, want_pages = jax.jit(partial(ragged_forward, graphdef))(state, tokens, pages, batch)
    kernel_graphdef, _ = abstract_model(KERNEL_CONFIG, plan, lora_impl="pallas_interpret")
    got, got_pages = jax.jit(partial(ragged_forward, kernel_graphdef))(state, tokens, pages, batch)
    real = int(q_lens.sum())
    np.testing.assert_allclose(np.asarray(got)[:real], np.asarray(want)[:real], atol=1e-5, rtol=0)
    for g, w in zip(jax.tree.leaves(got_pages), jax.tree.leaves(want_pages)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_the_ragged_step_lowers_to_one_paged_attention_kernel_per_layer_for_cuda():
    config = dataclasses.replace(KERNEL_CONFIG, num_layers=3)
    plan = make_plan(make_mesh("1x2"), "replicated", config)
    batch = RaggedBatch(jnp.zeros((4, 3), jnp.int32), jnp.ones(4, jnp.int32), jnp.ones(4, jnp.int32))
    graphdef, _ = abstract_model(config, plan, lora_impl="pallas")
    step = jax.jit(partial(ragged_forward, graphdef))
    lowered = step.trace(init_model(config, plan)[1], jnp.zeros(32, jnp.int32), init_pages(config, plan, 12, 16),
                         batch).lower(lowering_platforms=("cuda",))
    assert {name: k["count"] for name, k in triton_kernels(lowered.as_text()).items()} == {"paged_attention": 3}
