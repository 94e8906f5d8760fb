"""Ragged steps over a paged KV cache give the full forward's logits: any chunking of prompts, decode tokens beside
prompt chunks in one step, each token with its own adapter (none, dense LoRA, BD-LoRA), on every mesh × strategy."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdlora_jax import Engine
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.model.llama import AdapterBatch, RaggedBatch, init_pages, ragged_forward

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
                             query_block=4 if s % 2 else 16)
        np.testing.assert_allclose(np.asarray(logits)[:len(expected)], np.stack(expected), atol=1e-5, rtol=0,
                                   err_msg=f"step {s}")
