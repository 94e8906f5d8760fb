"""logit_bias, presence / frequency / repetition penalties, logprobs, ignore_eos and min_tokens, in the engine and
through POST /v1/completions.

One module-scoped demo Engine (mesh 1x2, bdlora) is driven by its Scheduler thread, as the server runs it: the
engine-level cases submit Requests to that scheduler, and their references (Engine.logits) run in the scheduler
thread between steps, so nothing else ever touches the engine.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest
from helpers import penalized_reference, running_scheduler

from bdlora_jax import Engine
from bdlora_jax.demo import demo_adapters
from bdlora_jax.engine.generator import Request
from bdlora_jax.engine.sampler import SamplingParams

pytestmark = pytest.mark.xdist_group("sampling_surface")  # one worker builds the module's served engine once

ENGINE_OPTS = dict(mesh="1x2", strategy="bdlora", max_loras=2, max_lora_rank=16, max_batch=4, max_seq_len=128)
SERVED = "demo"
EOS = 257
# Greedy outputs of the demo model: the base model ends "abc" at once with EOS; the reverse adapter repeats itself.
EARLY_EOS = ("abc", None)
REPEATS = ("hello world", "reverse")
REFERENCE_LEN = 32  # every prompt + output here fits


@pytest.fixture(scope="module")
def served():
    engine = Engine.from_pretrained("demo", **ENGINE_OPTS)
    for name, path in demo_adapters().items():
        engine.add_adapter(name, path)
    with running_scheduler(engine, warm_up=False) as served:
        yield served


def generate(served, prompt: str, adapter: str | None, **params) -> Request:
    """A greedy (unless params say else) request, run to its end by the scheduler thread."""
    engine, scheduler = served
    done = threading.Event()
    sampling = SamplingParams(**{"temperature": 0.0, **params})
    sampling.validate(engine.model_config.vocab_size)
    request = Request(engine._prompt_ids(prompt), adapter, sampling,
                      on_token=lambda r, _: r.finish_reason is not None and done.set())
    scheduler.submit(request)
    assert done.wait(300), "the request did not finish"
    assert request.finish_reason in ("stop", "length"), request.finish_reason
    return request


def step_logits(served, request: Request) -> np.ndarray:
    """The model's logits (len(output), vocab) at each generated position of a request, in one forward pass run in
    the scheduler thread (the model is causal, so each row equals that step's logits, and padding the sequence to
    REFERENCE_LEN tokens, for one compiled shape, changes none of them)."""
    engine, scheduler = served
    sequence = request.prompt + request.output[:-1]
    assert len(sequence) <= REFERENCE_LEN
    padded = sequence + [0] * (REFERENCE_LEN - len(sequence))
    logits = scheduler.call(lambda: engine.logits(padded, request.adapter)).result(300)
    return np.array(logits[len(request.prompt) - 1:len(sequence)])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------- engine


def test_logit_bias_forces_a_token_and_bans_the_greedy_choice(served):
    prompt, adapter = REPEATS
    plain = generate(served, prompt, adapter, max_tokens=4, ignore_eos=True)
    forced = generate(served, prompt, adapter, max_tokens=4, ignore_eos=True, logit_bias=((ord("z"), 100.0),))
    assert forced.output == [ord("z")] * 4 != plain.output
    banned = generate(served, prompt, adapter, max_tokens=1, logit_bias=((plain.output[0], -100.0),))
    logits = step_logits(served, banned)[0]
    logits[plain.output[0]] -= 100.0
    assert banned.output[0] != plain.output[0] and banned.output[0] == int(np.argmax(logits))


@pytest.mark.parametrize("prompt, adapter", [REPEATS, ("reverse: hello", None)])
def test_penalties_equal_the_reference_applied_step_by_step(served, prompt, adapter):
    penalties = dict(repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.3)
    bias = {ord("e"): 1.5}
    plain = generate(served, prompt, adapter, max_tokens=12, ignore_eos=True)
    penalized = generate(served, prompt, adapter, max_tokens=12, ignore_eos=True, logprobs=1,
                         logit_bias=tuple(bias.items()), **penalties)
    assert penalized.output != plain.output
    logits = step_logits(served, penalized)
    for i, token in enumerate(penalized.output):
        adjusted = penalized_reference(logits[i], bias, penalized.prompt, penalized.output[:i],
                                       penalties["repetition_penalty"], penalties["frequency_penalty"],
                                       penalties["presence_penalty"])
        assert adjusted[token] >= adjusted.max() - 1e-3, (i, token, int(np.argmax(adjusted)))
        # logprobs are the model's own (vLLM's default), before bias and penalties
        assert penalized.logprobs[i].logprob == pytest.approx(log_softmax(logits[i])[token], abs=1e-3)


@pytest.mark.parametrize("prompt, adapter", [("hello world", None), ("upper: cat", "reverse")])
def test_logprobs_are_log_softmax_of_the_logits_at_the_chosen_and_top_tokens(served, prompt, adapter):
    request = generate(served, prompt, adapter, max_tokens=6, ignore_eos=True, logprobs=5)
    logp = log_softmax(step_logits(served, request))
    assert [e.token for e in request.logprobs] == request.output
    for i, entry in enumerate(request.logprobs):
        assert entry.logprob == pytest.approx(logp[i, entry.token], abs=1e-4)
        assert [t for t, _ in entry.top] == list(np.argsort(-logp[i], kind="stable")[:5])
        np.testing.assert_allclose([v for _, v in entry.top], logp[i, [t for t, _ in entry.top]], atol=1e-4)
    assert generate(served, prompt, adapter, max_tokens=2).logprobs == []


def test_eos_ends_a_completion_unless_ignore_eos(served):
    stopped = generate(served, *EARLY_EOS, max_tokens=8)
    assert stopped.finish_reason == "stop" and stopped.output[-1] == EOS and len(stopped.output) < 8
    for max_tokens in (1, 8, 13):
        kept = generate(served, *EARLY_EOS, max_tokens=max_tokens, ignore_eos=True)
        assert kept.finish_reason == "length" and len(kept.output) == max_tokens
    assert EOS in kept.output[1:]  # it would have stopped more than once


def test_min_tokens_bans_eos_and_stop_tokens_and_defers_stop_strings(served):
    request = generate(served, *EARLY_EOS, max_tokens=20, min_tokens=6, stop_token_ids=(ord("a"),))
    assert len(request.output) >= 6 and not {EOS, ord("a")} & set(request.output[:6])
    prompt, adapter = REPEATS
    assert generate(served, prompt, adapter, max_tokens=20, stop=("e",)).output == [ord("e")]
    deferred = generate(served, prompt, adapter, max_tokens=20, stop=("e",), min_tokens=4)
    assert deferred.finish_reason == "stop" and len(deferred.output) == 4


def test_plain_requests_take_the_plain_sampler_and_the_rest_the_full_one(served, monkeypatch):
    from bdlora_jax.engine import generator

    full_steps = []
    record = generator.record_tokens_jit
    monkeypatch.setattr(generator, "record_tokens_jit", lambda *args: full_steps.append(1) or record(*args))
    generate(served, *REPEATS, max_tokens=3, ignore_eos=True)
    generate(served, *REPEATS, max_tokens=3, ignore_eos=True, temperature=0.8, top_k=5, stop=("q",))
    assert full_steps == []
    generate(served, *REPEATS, max_tokens=3, ignore_eos=True, logprobs=0)
    assert len(full_steps) == 3  # the prefill's first token, then two decode steps


# ---------------------------------------------------------------------------------------------- server


def call(app, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve.test",
                                     timeout=300) as c:
            return await c.post("/v1/completions", json={"model": SERVED, **body})

    return asyncio.run(go())


@pytest.mark.parametrize("body, needles", [
    ({"logit_bias": {"a": 1}}, ["logit_bias", "'a'"]),
    ({"logit_bias": {"999": 1}}, ["logit_bias", "999"]),
    ({"logit_bias": {"5": 101}}, ["logit_bias", "101"]),
    ({"logit_bias": {"5": "up"}}, ["logit_bias"]),
    ({"presence_penalty": 2.5}, ["presence_penalty", "2.5"]),
    ({"frequency_penalty": -3}, ["frequency_penalty", "-3"]),
    ({"repetition_penalty": 0}, ["repetition_penalty", "0"]),
    ({"logprobs": 21}, ["logprobs", "21"]),
    ({"logprobs": True}, ["logprobs"]),
    ({"min_tokens": 17, "max_tokens": 16}, ["min_tokens", "17"]),
    ({"ignore_eos": "yes"}, ["ignore_eos"]),
])
def test_bad_sampling_fields_get_400_naming_the_field(app, body, needles):
    response = call(app, {"prompt": "Hi", **body})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert all(n in message for n in needles), message


def test_served_fields_reach_the_sampler(app):
    forced = call(app, {"prompt": "hello world", "max_tokens": 3, "temperature": 0, "logit_bias": {"122": 100}})
    assert forced.json()["choices"][0]["text"] == "zzz"
    prompt, _ = EARLY_EOS
    kept = call(app, {"prompt": prompt, "max_tokens": 7, "temperature": 0, "ignore_eos": True}).json()
    assert (kept["choices"][0]["finish_reason"], kept["usage"]["completion_tokens"]) == ("length", 7)
    held = call(app, {"prompt": prompt, "max_tokens": 7, "temperature": 0, "min_tokens": 3}).json()
    assert held["usage"]["completion_tokens"] >= 3


def test_served_logprobs_in_the_legacy_format_whole_and_streamed(app):
    body = {"model": "reverse", "prompt": "hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 3}
    whole = call(app, body).json()["choices"][0]
    logprobs = whole["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(logprobs["tokens"]) == whole["text"] and len(logprobs["tokens"]) == 6
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(6)]
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert 1 <= len(top) <= 4 and top[token] == logprob and max(top.values()) <= 0
    streamed = call(app, {**body, "stream": True})
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0]["logprobs"] for e in events[:-1]]
    joined = {key: [v for chunk in chunks for v in chunk[key]] for key in logprobs}
    assert joined == logprobs
    plain = call(app, {**body, "logprobs": None}).json()["choices"][0]
    assert plain["logprobs"] is None and plain["text"] == whole["text"]
