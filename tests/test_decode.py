"""Prefill followed by token-by-token decode through the KV cache gives the full-forward logits, and a full forward
long enough for several query blocks gives what the same tokens give through the cache."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdlora_jax import Engine
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.model.llama import QUERY_BLOCK, AdapterBatch, forward, init_cache

PREFIX = [5, 9, 3, 7]  # prompt length of each row; rows then decode up to LENGTH tokens
LENGTH = 12


@pytest.mark.parametrize("mesh,strategy", [("1x1", "bdlora"), ("1x8", "slora"), ("2x4", "bdlora"), ("1x4", "replicated")])
def test_prefill_then_decode_equals_full_forward(hf_dir, mesh, strategy):
    eng = Engine.from_pretrained(hf_dir / "model", mesh=mesh, strategy=strategy, max_loras=3, max_lora_rank=16)
    eng.add_adapter("lora", hf_dir / "adapters" / "lora_rs_r4_qv")
    eng.add_adapter("bd", random_adapter(eng.model_config, "bd", rank=8, nblocks=8, seed=4))
    names = [None, "lora", "bd", "bd"]
    rng = np.random.default_rng(1)
    sequences = [list(rng.integers(0, eng.model_config.vocab_size, LENGTH)) for _ in names]
    full = eng.batch_logits(sequences, names)

    rows = len(names)
    slots = jnp.asarray(eng.pool.slots_for(names), jnp.int32)
    adapters = AdapterBatch(eng.pool.bank, slots)
    step = jax.jit(partial(forward, eng.graphdef), donate_argnums=(3,))
    cache = init_cache(eng.model_config, eng.plan, rows, 32)
    prompt = np.zeros((rows, max(PREFIX)), np.int32)
    for i, n in enumerate(PREFIX):
        prompt[i, :n] = sequences[i][:n]
    logits, cache = step(eng.state, jnp.asarray(prompt), jnp.zeros(rows, jnp.int32), cache, adapters)
    logits = np.asarray(logits)
    for i, n in enumerate(PREFIX):
        np.testing.assert_allclose(logits[i, :n], full[i][:n], atol=1e-5, rtol=0)

    positions = np.array(PREFIX)
    while positions.min() < LENGTH:
        tokens = np.array([[sequences[i][min(p, LENGTH - 1)]] for i, p in enumerate(positions)], np.int32)
        logits, cache = step(eng.state, jnp.asarray(tokens), jnp.asarray(positions, jnp.int32), cache, adapters)
        logits = np.asarray(logits)
        for i, p in enumerate(positions):
            if p < LENGTH:
                np.testing.assert_allclose(logits[i, 0], full[i][p], atol=1e-5, rtol=0)
        positions = positions + 1


@pytest.mark.parametrize("mesh,kv_replicated", [("1x1", False), ("1x8", True)])
def test_a_full_forward_in_query_blocks_equals_the_forward_through_the_cache(hf_dir, mesh, kv_replicated):
    eng = Engine.from_pretrained(hf_dir / "model", mesh=mesh, strategy="slora", max_loras=2, max_lora_rank=16)
    assert eng.plan.kv_replicated == kv_replicated  # 4 kv heads: grouped on 1 device, repeated on 8
    eng.add_adapter("lora", hf_dir / "adapters" / "lora_rs_r4_qv")
    length = 2 * QUERY_BLOCK + 22  # two whole query blocks and a part of one
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, eng.model_config.vocab_size, (2, length)), jnp.int32)
    slots = jnp.asarray(eng.pool.slots_for([None, "lora"]), jnp.int32)  # writes the slot: before reading the bank
    adapters = AdapterBatch(eng.pool.bank, slots)
    start = jnp.zeros(2, jnp.int32)
    run = jax.jit(partial(forward, eng.graphdef))
    blocked, _ = run(eng.state, tokens, start, None, adapters)
    cached, _ = run(eng.state, tokens, start, init_cache(eng.model_config, eng.plan, 2, length), adapters)
    # a block sums its softmax over fewer keys than the cache's one pass does, so float32 rounds differently
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(cached), atol=1e-5, rtol=1e-5)
