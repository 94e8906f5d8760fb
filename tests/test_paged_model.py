"""Ragged steps over a paged KV cache give the full forward's logits: any chunking of prompts, decode tokens beside
prompt chunks in one step, each token with its own adapter (none, dense LoRA, BD-LoRA), on every mesh × strategy;
and the Pallas paged-attention kernel (interpret mode) in the ragged step gives the XLA attention's logits."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdlora_jax import Engine
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.bench.triton_lowering import triton_kernels
from bdlora_jax.config import ModelConfig
from bdlora_jax.mesh import make_mesh
from bdlora_jax.model.llama import AdapterBatch, RaggedBatch, abstract_model, init_model, init_pages, ragged_forward
from bdlora_jax.sharding import make_plan

LENGTH = 12
PAGE_SIZE = 4
NAMES = [None, "lora", "bd", "bd", "lora"]
# tokens each request feeds per step (0: idle that step); every row sums to LENGTH
CHUNKS = [[5, 4, 1, 1, 1],   # a prompt in two chunks, then decode tokens
          [1, 1, 1, 1, 8],   # decode tokens from the start, then the rest in one chunk
          [12, 0, 0, 0, 0],  # one whole prompt, then idle
          [3, 3, 3, 2, 1],
          [0, 6, 0, 6, 0]]   # idle steps between chunks
MESH_STRATEGIES = [("1x1", "bdlora"), ("1x8", "slora"), ("1x8", "bdlora"), ("2x4", "bdlora"), ("1x4", "replicated"),
                   ("1x2", "slora")]


@pytest.mark.parametrize("mesh,strategy", MESH_STRATEGIES)
def test_ragged_paged_steps_equal_the_full_forward(hf_dir, mesh, strategy):
    eng = Engine.from_pretrained(hf_dir / "model", mesh=mesh, strategy=strategy, max_loras=3, max_lora_rank=32)
    eng.add_adapter("lora", hf_dir / "adapters" / "lora_rs_r4_qv")
    eng.add_adapter("bd", random_adapter(eng.model_config, "bd", rank=8, nblocks=8, seed=4))
    rng = np.random.default_rng(1)
    sequences = [list(rng.integers(0, eng.model_config.vocab_size, LENGTH)) for _ in NAMES]
    full = eng.batch_logits(sequences, NAMES)
    slots = eng.pool.slots_for(NAMES)

    per_request = -(-LENGTH // PAGE_SIZE)
    num_pages = len(NAMES) * per_request + 2
    page_tables = rng.permutation(num_pages)[:len(NAMES) * per_request].reshape(len(NAMES), per_request)
    pages = init_pages(eng.model_config, eng.plan, num_pages, PAGE_SIZE)
    step = jax.jit(partial(ragged_forward, eng.graphdef), donate_argnums=(2,), static_argnames="query_block")
    tokens_fed = np.zeros(len(NAMES), np.int32)
    for s in range(len(CHUNKS[0])):
        q_lens = np.array([chunks[s] for chunks in CHUNKS], np.int32)
        tokens, token_slots, expected = [], [], []
        for r, n in enumerate(q_lens):
            for p in range(tokens_fed[r], tokens_fed[r] + n):
                tokens.append(sequences[r][p])
                token_slots.append(slots[r])
                expected.append(full[r][p])
        padded = -(-(len(tokens) + 1) // 8) * 8  # at least one padding token, a multiple of the data axis
        tokens += [0] * (padded - len(tokens))
        token_slots += [0] * (padded - len(token_slots))
        tokens_fed += q_lens
        batch = RaggedBatch(jnp.asarray(page_tables, jnp.int32), jnp.asarray(tokens_fed), jnp.asarray(q_lens))
        adapters = AdapterBatch(eng.pool.bank, jnp.asarray(token_slots, jnp.int32))
        logits, pages = step(eng.state, jnp.asarray(tokens, jnp.int32), pages, batch, adapters,
                             query_block=(16, 4, 1)[s % 3])  # 1: per token, as decode steps attend
        np.testing.assert_allclose(np.asarray(logits)[:len(expected)], np.stack(expected), atol=1e-5, rtol=0,
                                   err_msg=f"step {s}")


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
