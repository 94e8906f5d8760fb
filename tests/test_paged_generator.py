"""The paged generator: ragged steps that mix prompt chunks with decode tokens give the contiguous cache's
completions (greedy, mixed adapters, penalties), a pool too small for every request preempts and recomputes with
the same completions, cancelled and finished requests return their pages, and after warm-up nothing compiles."""

import dataclasses

import numpy as np
import pytest
from helpers import FIXTURE_ADAPTERS

from bdlora_jax import Engine
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.engine.generator import Request
from bdlora_jax.engine.metrics import CompileCounter
from bdlora_jax.engine.page_pool import PagePool, page_keys
from bdlora_jax.engine.paged_generator import PagedGenerator
from bdlora_jax.engine.sampler import SamplingParams

pytestmark = pytest.mark.xdist_group("paged_generator")  # one worker builds the module's engines once

LENGTHS = (3, 17, 9, 30, 12, 5, 21, 16, 40, 7)
ADAPTERS = [None, "lora_r8", "bdlora_nb2_r8", "lora_rs_r4_qv", None, "bdlora_nb4_r8", "lora_r8", "bdlora_nb2_r8",
            "lora_rs_r4_qv", None]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
GREEDY_SHORT = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PENALISED = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5,
                           frequency_penalty=0.4, logit_bias=((7, 3.0),))


def _engine(hf_dir, mesh="1x2", strategy="bdlora", **paging) -> Engine:
    eng = Engine.from_pretrained(hf_dir / "model", mesh=mesh, strategy=strategy, max_loras=4, max_lora_rank=16,
                                 max_batch=6, max_seq_len=64, **paging)
    for name in FIXTURE_ADAPTERS:
        eng.add_adapter(name, hf_dir / "adapters" / name)
    return eng


def _requests(vocab: int) -> list[Request]:
    rng = np.random.default_rng(0)
    return [Request(list(map(int, rng.integers(1, vocab, n))), adapter, PENALISED if i % 3 == 2 else GREEDY)
            for i, (n, adapter) in enumerate(zip(LENGTHS, ADAPTERS))]


@pytest.fixture(scope="module")
def contiguous_outputs(hf_dir):
    eng = _engine(hf_dir)
    return [r.output for r in eng.generator.run(_requests(eng.model_config.vocab_size))]


def test_the_page_pool_grows_a_requests_pages_and_takes_them_back():
    pool = PagePool(5, 4)
    first, second = [], []
    assert pool.grow(first, 9) and first == [0, 1, 2] and pool.free == 2
    assert pool.grow(first, 12) and len(first) == 3  # still three pages
    assert not pool.grow(second, 12) and second == [] and pool.free == 2  # three pages needed, two free: none taken
    assert pool.grow(second, 8) and pool.used == 5
    pool.release(first)
    assert first == [] and pool.free == 3 and pool.pages_for(13) == 4


def test_registered_pages_are_reused_by_prefix_held_counted_and_evicted_least_recent_first():
    pool = PagePool(4, 2)
    tokens = [5, 6, 7, 8, 9]
    keys = page_keys("lora:1:a", tokens, 2, 2)
    assert keys == page_keys("lora:1:a", tokens[:4] + [0], 2, 2)  # a key names its page and everything before
    assert page_keys("lora:2:a", tokens, 2, 2)[0] != keys[0]  # another adapter (registration): other keys
    assert page_keys("lora:1:a", [5, 6, 0, 8], 2, 2)[1] != keys[1]
    first = []
    assert pool.grow(first, 5) and first == [0, 1, 2]
    pool.register(first[0], keys[0])
    pool.register(first[1], keys[1])
    second = pool.match(keys)
    assert second == [0, 1] and pool.used == 3
    pool.release(first)  # pages 0 and 1 are still held by the second request; page 2 is free again
    assert pool.used == 2 and pool.free == 2
    pool.release(second)  # nobody holds them: cached, yet takeable
    assert pool.used == 0 and pool.match(keys[:1]) == [0]  # held again, so never evicted while held
    other = []
    assert pool.grow(other, 6) and sorted(other) == [1, 2, 3]  # two free pages, then the idle cached page 1
    assert pool.match(keys) == [0]  # page 1 went with its key: the run stops after page 0


def test_prefix_cache_hits_give_the_logits_of_misses_and_never_cross_adapters(hf_dir):
    vocab_rng = np.random.default_rng(3)
    system = list(map(int, vocab_rng.integers(1, 200, 21)))  # five full pages of 4 and one token
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)
    first = Request(system + [7, 8], "lora_r8", params)
    same_adapter = Request(system + [9, 10, 11], "lora_r8", params)
    other_adapter = Request(system + [9, 10, 11], "bdlora_nb2_r8", params)
    paged = _engine(hf_dir, kv_cache="paged", page_size=4)
    paged.generator.run([first])
    queried, hit = paged.generator.prefix_cache_tokens()
    assert (queried, hit) == (20, 0)
    paged.generator.run([same_adapter])
    assert paged.generator.prefix_cache_tokens() == (40, 20)  # the five full pages of the system prompt
    paged.generator.run([other_adapter])
    assert paged.generator.prefix_cache_tokens() == (60, 20)  # nothing of another adapter's
    contiguous = _engine(hf_dir)
    for request in (same_adapter, other_adapter):
        alone = Request(request.prompt, request.adapter, params)
        contiguous.generator.run([alone])
        assert request.output == alone.output
        for got, want in zip(request.logprobs, alone.logprobs):
            assert [t for t, _ in got.top] == [t for t, _ in want.top]
            np.testing.assert_allclose([v for _, v in got.top], [v for _, v in want.top], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mesh,strategy,budget", [("1x2", "bdlora", 16), ("1x8", "slora", 40),
                                                 ("2x4", "replicated", 16)])
def test_ragged_steps_with_chunked_prefill_give_the_contiguous_caches_completions(hf_dir, contiguous_outputs,
                                                                                  mesh, strategy, budget):
    eng = _engine(hf_dir, mesh=mesh, strategy=strategy, kv_cache="paged", page_size=4, max_num_batched_tokens=budget)
    gen = eng.generator
    assert isinstance(gen, PagedGenerator)
    requests = _requests(eng.model_config.vocab_size)
    mixed_steps = []
    for request in requests:
        gen.submit(request)
    while gen.has_work():
        before = {row: gen.progress[row].computed for row in gen.running}
        prefilling = [row for row, r in gen.running.items() if gen.progress[row].computed < len(r.prompt)]
        decoding = [row for row, r in gen.running.items() if gen.progress[row].computed >= len(r.prompt)]
        gen.step()
        mixed_steps.append(bool(prefilling and decoding) and any(row in gen.progress and
                                                                    gen.progress[row].computed > before[row]
                                                                    for row in prefilling))
    assert any(mixed_steps)  # some step fed a prompt chunk beside decode tokens
    assert [r.output for r in requests] == contiguous_outputs
    assert gen.pages_used == 0 and gen.preemptions == 0


def test_a_pool_too_small_for_every_request_preempts_and_recomputes_the_same_completions(hf_dir):
    """Every request penalises repeats, so a request recomputed after its first tokens must count them again."""
    outputs = []
    for paging in ({}, dict(kv_cache="paged", page_size=4, num_pages=24, max_num_batched_tokens=64)):
        eng = _engine(hf_dir, **paging)
        requests = [dataclasses.replace(r, params=PENALISED) for r in _requests(eng.model_config.vocab_size)]
        eng.generator.run(requests)
        outputs.append([r.output for r in requests])
    assert eng.generator.preemptions > 0
    assert outputs[1] == outputs[0]
    assert eng.generator.pages_used == 0


def test_a_pool_that_cannot_hold_one_longest_request_or_a_budget_below_the_rows_is_refused(hf_dir):
    with pytest.raises(ValueError, match=r"num_pages=15: 15 pages of 4 tokens cannot hold one request of "
                                         r"max_seq_len=64 tokens; expected at least 16 pages"):
        _engine(hf_dir, kv_cache="paged", page_size=4, num_pages=15)
    with pytest.raises(ValueError, match="max_num_batched_tokens=4: expected at least max_batch=6"):
        _engine(hf_dir, kv_cache="paged", max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="kv_cache='ring': expected one of"):
        _engine(hf_dir, kv_cache="ring")


def test_cancelled_and_finished_requests_return_their_pages(hf_dir):
    eng = _engine(hf_dir, kv_cache="paged", page_size=4)
    gen = eng.generator
    requests = _requests(eng.model_config.vocab_size)[:4]
    for request in requests:
        gen.submit(request)
    for _ in range(3):
        gen.step()
    assert gen.pages_used > 0
    held = {id(r): len(gen.progress[row].pages) for row, r in gen.running.items()}
    victim = next(iter(gen.running.values()))
    victim.cancelled = True
    used = gen.pages_used
    gen.step()
    assert victim.finish_reason == "abort" and victim not in gen.running.values()
    assert gen.pages_used <= used - held[id(victim)] + len(gen.running)  # its pages back; others grew a page at most
    while gen.has_work():
        gen.step()
    assert gen.pages_used == 0


def test_no_compilation_after_warm_up_in_a_mixed_paged_run(hf_dir):
    CompileCounter.install()
    eng = _engine(hf_dir, kv_cache="paged", page_size=4, num_pages=40, max_num_batched_tokens=32)
    eng.pool.warm_up()
    eng.generator.warm_up()
    before = CompileCounter.count()
    params = [GREEDY, PENALISED, SamplingParams(temperature=0.8, top_p=0.9, max_tokens=7),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=4, logprobs=2),
              SamplingParams(temperature=0.7, max_tokens=6, min_tokens=4)]
    requests = [dataclasses.replace(r, params=dataclasses.replace(params[i % len(params)], ignore_eos=True))
                for i, r in enumerate(_requests(eng.model_config.vocab_size) * 2)]
    eng.generator.run(requests)
    assert all(r.finish_reason == "length" for r in requests)
    assert CompileCounter.count() == before


def test_warm_up_with_more_adapter_slots_than_the_smallest_step_has_tokens_compiles_every_step(hf_dir):
    CompileCounter.install()
    eng = Engine.from_pretrained(hf_dir / "model", mesh="1x1", max_loras=16, max_lora_rank=8, max_batch=16,
                                 max_seq_len=16, kv_cache="paged", page_size=4, max_num_batched_tokens=16)
    for i in range(16):
        eng.add_adapter(f"r{i}", random_adapter(eng.model_config, f"r{i}", rank=8, seed=i))
    assert eng.generator.step_sizes[0] < eng.generator.group_sizes[-1]  # 8 tokens, up to 16 distinct adapters
    eng.pool.warm_up()
    eng.generator.warm_up()
    before = CompileCounter.count()
    rng = np.random.default_rng(1)
    requests = [Request(list(map(int, rng.integers(1, eng.model_config.vocab_size, 1 + i % 5))), f"r{i}", GREEDY_SHORT)
                for i in range(16)]
    eng.generator.run(requests)  # 16 distinct adapters in the decode steps, fewer in the prompt steps
    assert all(r.finish_reason == "length" for r in requests)
    assert CompileCounter.count() == before
