"""The generator: batched prefill equals one prompt per call, an all-greedy decode step takes its own argmax, and
after warm-up a mixed run compiles nothing."""

import dataclasses

import numpy as np
import pytest
from helpers import FIXTURE_ADAPTERS

import bdlora_jax.engine.generator as generator_module
from bdlora_jax import Engine
from bdlora_jax.engine.generator import Request, StepPlan
from bdlora_jax.engine.metrics import CompileCounter
from bdlora_jax.engine.sampler import SamplingParams, first_argmax

pytestmark = pytest.mark.xdist_group("generator")  # one worker builds the module's engines once

LENGTHS = (3, 17, 9, 30, 12, 5, 21, 16)  # two length buckets (16, 32), eight prompts


def _engine(hf_dir) -> Engine:
    eng = Engine.from_pretrained(hf_dir / "model", mesh="1x2", strategy="bdlora", max_loras=4, max_lora_rank=16,
                                 max_batch=8, max_seq_len=64)
    for name in FIXTURE_ADAPTERS:
        eng.add_adapter(name, hf_dir / "adapters" / name)
    return eng


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(1, vocab, n))) for n in LENGTHS]


ADAPTERS = [None, "lora_r8", "bdlora_nb2_r8", "lora_rs_r4_qv", None, "bdlora_nb4_r8", "lora_r8", "bdlora_nb2_r8"]


@pytest.fixture(scope="module")
def engines(hf_dir):
    batched, single = _engine(hf_dir), _engine(hf_dir)
    single.generator.prefill_sizes = single.generator.prefill_sizes[:1]  # one data-sized batch per call
    return batched, single


def test_batched_prefill_writes_the_cache_and_first_tokens_of_one_prompt_per_call(engines):
    batched, single = engines
    prompts = _prompts(batched.model_config.vocab_size)[:4]  # lengths 3..30: buckets 16 and 32
    for eng in (batched, single):
        gen = eng.generator
        entries = [(row, Request(p, a, SamplingParams(temperature=0.0, seed=0)), list(eng.resolve([a])[0]) + [0, 0])
                   for row, (p, a) in enumerate(zip(prompts, ADAPTERS))]
        gen._prefill_admitted(entries)
    assert batched.generator.prefill_batches(16)[-1] >= 4  # the four prompts shared calls
    np.testing.assert_array_equal(batched.generator.tokens[:4], single.generator.tokens[:4])
    np.testing.assert_array_equal(batched.generator.positions[:4], single.generator.positions[:4])
    for (k_b, v_b), (k_s, v_s) in zip(batched.generator.cache, single.generator.cache):
        for row, n in enumerate(LENGTHS[:4]):
            np.testing.assert_allclose(np.asarray(k_b)[row, ..., :n], np.asarray(k_s)[row, ..., :n], atol=1e-5, rtol=0)
            np.testing.assert_allclose(np.asarray(v_b)[row, :, :n], np.asarray(v_s)[row, :, :n], atol=1e-5, rtol=0)


def test_batched_prefill_gives_the_greedy_continuations_of_one_prompt_per_call(engines):
    batched, single = engines
    prompts = _prompts(batched.model_config.vocab_size)
    want = single.generate(prompts, adapters=ADAPTERS, max_tokens=6)
    got = batched.generate(prompts, adapters=ADAPTERS, max_tokens=6)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_all_greedy_decode_steps_take_the_step_argmax_and_a_sampling_row_takes_the_sampler(engines, monkeypatch):
    eng = engines[0]
    gen = eng.generator
    calls = []
    sample = generator_module._sample
    monkeypatch.setattr(generator_module, "_sample", lambda *a, **k: calls.append(1) or sample(*a, **k))
    prompts = _prompts(eng.model_config.vocab_size)[:2]
    entries = [(row, Request(p, a, SamplingParams(temperature=0.0, seed=0)), list(eng.resolve([a])[0]) + [0, 0])
               for row, (p, a) in enumerate(zip(prompts, ADAPTERS[:2]))]
    gen._prefill_admitted(entries)
    for row, request, _ in entries:
        gen.running[row] = request
    try:
        slots = tuple(eng.resolve([ADAPTERS[0], ADAPTERS[1]])[0]) + (0,) * (gen.rows - 2)
        plan = StepPlan((), slots, tuple(range(gen.rows)), (0,) * gen.rows, (0,) * gen.rows)
        logits, greedy = gen._decode_logits(plan)
        np.testing.assert_array_equal(np.asarray(greedy), np.asarray(first_argmax(logits)))
        calls.clear()
        gen._sample_rows(logits, [gen.running.get(i) for i in range(gen.rows)], np.arange(gen.rows), greedy=greedy)
        assert calls == []  # every row greedy: the step's own argmax
        gen.running[1] = Request(prompts[1], ADAPTERS[1], SamplingParams(temperature=0.7, seed=1))
        gen._sample_rows(logits, [gen.running.get(i) for i in range(gen.rows)], np.arange(gen.rows), greedy=greedy)
        assert calls == [1]  # a sampling row: the sampler
    finally:
        gen.running.clear()


def test_no_compilation_after_warm_up_in_a_mixed_run_of_sampling_penalties_and_logprobs(hf_dir):
    CompileCounter.install()
    eng = _engine(hf_dir)
    eng.pool.warm_up()
    eng.generator.warm_up()
    before = CompileCounter.count()
    prompts = _prompts(eng.model_config.vocab_size) * 2
    params = [SamplingParams(temperature=0.0, max_tokens=5), SamplingParams(temperature=0.8, top_p=0.9, max_tokens=7),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=4), SamplingParams(temperature=1.2, max_tokens=6),
              SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.3, logprobs=3),
              SamplingParams(temperature=0.7, max_tokens=6, logit_bias=((5, 2.0),), min_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=4, logprobs=0, presence_penalty=0.5, frequency_penalty=0.5)]
    params = [dataclasses.replace(p, ignore_eos=True) for p in params]  # every row runs to max_tokens
    requests = [Request(p, ADAPTERS[i % len(ADAPTERS)], params[i % len(params)]) for i, p in enumerate(prompts)]
    eng.generator.run(requests)
    assert all(r.finish_reason == "length" for r in requests)
    assert CompileCounter.count() == before
