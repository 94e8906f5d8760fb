"""Engine.generate: continuous batching reproduces transformers' greedy continuations for every adapter."""

import json

import pytest

from bdlora_jax import Engine

ADAPTERS = ("lora_r8", "lora_rs_r4_qv", "bdlora_nb2_r8", "bdlora_nb4_r8")


@pytest.fixture(scope="module")
def greedy(hf_dir):
    return json.loads((hf_dir / "greedy.json").read_text())


@pytest.mark.parametrize("mesh,strategy", [("1x1", "replicated"), ("1x2", "bdlora"), ("2x2", "slora")])
def test_greedy_generate_matches_transformers(hf_dir, greedy, mesh, strategy):
    eng = Engine.from_pretrained(hf_dir / "model", mesh=mesh, strategy=strategy, max_loras=2, max_lora_rank=16,
                                 max_batch=4, max_seq_len=64)
    for name in ADAPTERS:
        eng.add_adapter(name, hf_dir / "adapters" / name)
    prompts, names, expected = [], [], []
    for name in (None,) + ADAPTERS:
        for prompt, continuation in zip(greedy["prompts"], greedy[name or "base"]):
            prompts.append(prompt)
            names.append(name)
            expected.append(continuation)
    # 15 requests over 4 decode rows and 2 adapter slots: requests wait for rows and slots, none fails
    results = eng.generate(prompts, adapters=names, max_tokens=greedy["max_new_tokens"], temperature=0.0)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)
    assert eng.pool.evictions > 0
    alone = eng.generate([prompts[-1]], adapters=[names[-1]], max_tokens=greedy["max_new_tokens"])
    assert alone[0].token_ids == expected[-1]


def test_text_prompts_stop_tokens_sampling_fields_and_errors(hf_dir, greedy):
    eng = Engine.from_pretrained(hf_dir / "model", mesh="1x1", strategy="replicated", max_loras=1, max_lora_rank=8,
                                 max_batch=2, max_seq_len=32)
    prompt = greedy["prompts"][0]
    text = eng.tokenizer.decode(prompt[1:])
    by_text = eng.generate(["<s>" + text], max_tokens=4)[0]
    assert by_text.token_ids == greedy["base"][0][:4]
    assert by_text.text == eng.tokenizer.decode(greedy["base"][0][:4])
    stop_at = greedy["base"][0][2]
    stopped = eng.generate([prompt], max_tokens=8, stop_token_ids=[stop_at])[0]
    assert stopped.token_ids == greedy["base"][0][:greedy["base"][0].index(stop_at) + 1]
    assert stopped.finish_reason == "stop"
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        eng.generate([prompt], max_tokens=30)
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        eng.generate([[1, 300]])
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate([[]])
    with pytest.raises(KeyError, match="nope"):
        eng.generate([prompt], adapters=["nope"])
    assert eng.generate([prompt], max_tokens=2)[0].token_ids == greedy["base"][0][:2]
    forced = eng.generate([prompt], max_tokens=3, logit_bias={5: 100.0}, logprobs=2, ignore_eos=True)[0]
    assert forced.token_ids == [5, 5, 5] and [e.token for e in forced.logprobs] == [5, 5, 5]
    assert all(len(e.top) == 2 and e.logprob <= e.top[0][1] for e in forced.logprobs)
    assert eng.generate([prompt], max_tokens=2)[0].logprobs is None


def test_adapters_are_reread_from_disk_and_a_vanished_one_fails_only_its_requests(hf_dir, greedy, tmp_path):
    import shutil

    eng = Engine.from_pretrained(hf_dir / "model", mesh="1x1", strategy="replicated", max_loras=1, max_lora_rank=8,
                                 max_batch=2, max_seq_len=32)
    for name in ("lora_r8", "bdlora_nb2_r8"):
        shutil.copytree(hf_dir / "adapters" / name, tmp_path / name)
        eng.add_adapter(name, tmp_path / name)
    assert eng.pool.adapters["lora_r8"] == tmp_path / "lora_r8"  # only the path stays on the host
    prompt, n = greedy["prompts"][0], greedy["max_new_tokens"]
    assert eng.generate([prompt], adapters=["lora_r8"], max_tokens=n)[0].token_ids == greedy["lora_r8"][0]
    shutil.rmtree(tmp_path / "bdlora_nb2_r8")
    results = eng.generate([prompt, prompt, prompt], adapters=["bdlora_nb2_r8", "lora_r8", None], max_tokens=n)
    assert results[0].finish_reason == "error" and results[0].token_ids == []
    assert results[1].token_ids == greedy["lora_r8"][0] and results[2].token_ids == greedy["base"][0]
    assert list(eng.pool.resident) == ["lora_r8"]
