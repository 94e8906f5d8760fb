"""The OpenAI-compatible HTTP API, in process: every bad input gets a 4xx with an OpenAI error body
naming the field or value, and the server goes on serving; models, adapter load / use / unload, metrics, stop
strings, streaming, API key and --lora-root.

One module-scoped Engine (demo model, mesh 1x2, bdlora) is driven by its Scheduler thread, exactly as the server
runs it; requests go through httpx's ASGI transport (no sockets). A second, separate Engine gives the references
for greedy outputs (Engine.generate must never run on the engine that a Scheduler is driving).
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest
from helpers import running_scheduler
from prometheus_client.parser import text_string_to_metric_families

from bdlora_jax import Engine
from bdlora_jax.adapters.peft_io import write_adapter
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.demo import demo_adapters
from bdlora_jax.engine.scheduler import Scheduler
from bdlora_jax.server import MAX_BODY_BYTES, create_app

pytestmark = pytest.mark.xdist_group("serve_api")  # one worker builds the module's served engine once

ENGINE_OPTS = dict(mesh="1x2", strategy="bdlora", max_loras=2, max_lora_rank=16, max_batch=4, max_seq_len=128)
MAX_SEQ_LEN = ENGINE_OPTS["max_seq_len"]
SERVED = "demo"
API_KEY = "sekret-key"
DEMO = sorted(demo_adapters())
METRIC_NAMES = (
    "bdlora_requests_running", "bdlora_requests_waiting", "bdlora_requests_finished", "bdlora_generated_tokens",
    "bdlora_tokens_per_second", "bdlora_adapter_loads", "bdlora_adapter_evictions", "bdlora_adapters_registered",
    "bdlora_compilations", "bdlora_compilations_after_warmup", "bdlora_time_to_first_token_seconds",
    "bdlora_time_per_output_token_seconds", "bdlora_e2e_request_latency_seconds",
)


# ---------------------------------------------------------------------------------------------- fixtures


def make_engine() -> Engine:
    engine = Engine.from_pretrained("demo", **ENGINE_OPTS)
    for name, path in demo_adapters().items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def served():
    engine = make_engine()
    with running_scheduler(engine) as served:
        yield served


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora_root")


@pytest.fixture(scope="module")
def secured_app(served, lora_root):
    """A second app over the same engine and scheduler, with an API key and --lora-root."""
    return create_app(*served, SERVED, api_key=API_KEY, lora_root=lora_root)


@pytest.fixture(scope="module")
def reference():
    """A separate engine (same model, mesh, strategy, adapters) that only Engine.generate drives."""
    return make_engine()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, engine) -> dict[str, Path]:
    """Random PEFT adapters on disk: dense rank 4 and BD-LoRA (2 blocks, rank 8)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "dense": write_adapter(random_adapter(engine.model_config, "dense", rank=4, seed=1), root / "dense"),
        "bd": write_adapter(random_adapter(engine.model_config, "bd", rank=8, nblocks=2, seed=2), root / "bd"),
        "big": write_adapter(random_adapter(engine.model_config, "big", rank=32, seed=3), root / "big"),
    }


# ---------------------------------------------------------------------------------------------- helpers


def client(app, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve.test", timeout=120,
                             **kwargs)


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with client(app) as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(go())


def complete(app, **body) -> httpx.Response:
    return call(app, "POST", "/v1/completions", json={"model": SERVED, **body})


def assert_error(response: httpx.Response, status: int, *needles: str, code: str | None = None) -> dict:
    """The status, and an OpenAI error body whose message contains every needle."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code"} <= set(error), body
    assert isinstance(error["message"], str) and isinstance(error["type"], str) and error["type"], body
    for needle in needles:
        assert needle in error["message"], f"{needle!r} not in {error['message']!r}"
    if code is not None:
        assert error["code"] == code, body
    return error


def assert_serving(app, model: str = SERVED, **headers) -> None:
    """A good request still succeeds."""
    response = call(app, "POST", "/v1/completions", headers=headers,
                    json={"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == model
    choice, usage = body["choices"][0], body["usage"]
    assert isinstance(choice["text"], str)
    assert usage["prompt_tokens"] == 5 and usage["total_tokens"] == 5 + usage["completion_tokens"]
    # "length" after exactly 3 tokens, or "stop" earlier should the engine ever stop at EOS by default
    assert (choice["finish_reason"], usage["completion_tokens"]) == ("length", 3) or \
        (choice["finish_reason"] == "stop" and 1 <= usage["completion_tokens"] <= 3), body


def sse_chunks(text: str) -> list[dict]:
    """The JSON events of a server-sent-event stream, checking it ends with [DONE]."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    return [json.loads(e) for e in events[:-1]]


def metrics(app) -> dict[str, float]:
    """Prometheus samples by name{labels}."""
    response = call(app, "GET", "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def settled_metrics(app, scheduler: Scheduler) -> dict[str, float]:
    """Metrics once the scheduler has booked the last step (a response can arrive just before its step is counted):
    a command runs only between steps, so waiting for an empty one is a barrier."""
    scheduler.call(lambda: None).result(60)
    return metrics(app)


def pause(scheduler: Scheduler, probe=lambda: None):
    """Hold the scheduler thread between two steps (a command that blocks); returns (release, probe's result).

    Commands queued while it is held run right after it, before the next generation step.
    """
    gate, entered, seen = threading.Event(), threading.Event(), {}

    def hold():
        seen["probe"] = probe()
        entered.set()
        gate.wait(60)

    future = scheduler.call(hold)
    assert entered.wait(60)
    return gate, future, seen["probe"]


async def hold_when(scheduler: Scheduler, condition, timeout: float = 60.0) -> threading.Event:
    """Pause the scheduler at the first step boundary where condition() (run in the scheduler thread) holds;
    returns the gate that releases it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        gate, _, holds = pause(scheduler, condition)
        if holds:
            return gate
        gate.set()
        assert loop.time() < deadline, "timed out waiting for the scheduler to reach the condition"
        await asyncio.sleep(0.002)


async def until(predicate, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------------------------- bad input


def _big_prompt() -> dict:
    return {"prompt": "x" * (MAX_BODY_BYTES + 10)}


BAD_COMPLETIONS = [
    # (id, body or raw bytes, status, needles in the message)
    ("missing-model", {"prompt": "Hi"}, 400, ["model"]),
    ("missing-prompt", {"model": SERVED}, 400, ["prompt"]),
    ("body-not-object", [1, 2, 3], 400, ["body"]),
    ("max_tokens-string", {"model": SERVED, "prompt": "Hi", "max_tokens": "ten"}, 400, ["max_tokens"]),
    ("max_tokens-float", {"model": SERVED, "prompt": "Hi", "max_tokens": 2.5}, 400, ["max_tokens"]),
    ("stream-string", {"model": SERVED, "prompt": "Hi", "stream": "yes"}, 400, ["stream"]),
    ("temperature-string", {"model": SERVED, "prompt": "Hi", "temperature": "hot"}, 400, ["temperature"]),
    ("prompt-number", {"model": SERVED, "prompt": 42}, 400, ["prompt"]),
    ("model-number", {"model": 7, "prompt": "Hi"}, 400, ["model"]),
    ("stop-number", {"model": SERVED, "prompt": "Hi", "stop": 3}, 400, ["stop"]),
    ("unknown-model", {"model": "no-such-adapter", "prompt": "Hi"}, 404, ["no-such-adapter"]),
    ("context-prompt+max_tokens", {"model": SERVED, "prompt": "x" * 100, "max_tokens": 29}, 400,
     ["max_tokens=29", "100", str(MAX_SEQ_LEN)]),
    ("context-prompt-alone", {"model": SERVED, "prompt": list(range(200)), "max_tokens": 1}, 400,
     ["200", str(MAX_SEQ_LEN)]),
    ("max_tokens-0", {"model": SERVED, "prompt": "Hi", "max_tokens": 0}, 400, ["max_tokens", "0"]),
    ("max_tokens-negative", {"model": SERVED, "prompt": "Hi", "max_tokens": -5}, 400, ["max_tokens", "-5"]),
    ("max_tokens-absurd", {"model": SERVED, "prompt": "Hi", "max_tokens": 10**12}, 400,
     ["max_tokens", str(10**12)]),
    ("max_tokens-bigint", {"model": SERVED, "prompt": "Hi", "max_tokens": 10**40}, 400, ["max_tokens"]),
    ("temperature-negative", {"model": SERVED, "prompt": "Hi", "temperature": -0.5}, 400, ["temperature", "-0.5"]),
    ("top_p-0", {"model": SERVED, "prompt": "Hi", "top_p": 0}, 400, ["top_p", "0"]),
    ("top_p-1.5", {"model": SERVED, "prompt": "Hi", "top_p": 1.5}, 400, ["top_p", "1.5"]),
    ("top_p-negative", {"model": SERVED, "prompt": "Hi", "top_p": -0.1}, 400, ["top_p", "-0.1"]),
    ("top_k-negative", {"model": SERVED, "prompt": "Hi", "top_k": -1}, 400, ["top_k", "-1"]),
    ("seed-negative", {"model": SERVED, "prompt": "Hi", "seed": -1}, 400, ["seed", "-1"]),
    ("n-0", {"model": SERVED, "prompt": "Hi", "n": 0}, 400, ["n", "0"]),
    ("empty-text-prompt", {"model": SERVED, "prompt": ""}, 400, ["prompt", "empty"]),
    ("empty-ids-prompt", {"model": SERVED, "prompt": []}, 400, ["prompt", "empty"]),
    ("empty-nested-prompt", {"model": SERVED, "prompt": [[]]}, 400, ["prompt", "empty"]),
    ("two-prompts", {"model": SERVED, "prompt": ["a", "b"]}, 400, ["prompt"]),
    ("token-id-over-vocab", {"model": SERVED, "prompt": [72, 101, 264]}, 400, ["264", "vocabulary"]),
    ("token-id-huge", {"model": SERVED, "prompt": [72, 10**9]}, 400, [str(10**9), "vocabulary"]),
    ("token-id-negative", {"model": SERVED, "prompt": [-1, 72]}, 400, ["-1", "vocabulary"]),
    ("stop_token_ids-over-vocab", {"model": SERVED, "prompt": "Hi", "stop_token_ids": [999]}, 400,
     ["stop_token_ids", "999"]),
]


@pytest.mark.parametrize("body,status,needles", [b[1:] for b in BAD_COMPLETIONS], ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_requests(app, body, status, needles):
    assert_error(call(app, "POST", "/v1/completions", json=body), status, *needles)
    assert_serving(app)


@pytest.mark.parametrize("raw", [b'{"model": "demo", "prompt": ', b"not json at all", b'{"model": "demo",}'])
def test_malformed_json(app, raw):
    response = call(app, "POST", "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "malformed JSON")
    assert_serving(app)


def test_unknown_model_code(app):
    assert_error(complete(app, model="nope", prompt="Hi"), 404, "'nope'", code="model_not_found")
    assert_error(complete(app, prompt="x" * 120, max_tokens=9), 400, "max_seq_len", code="context_length_exceeded")


def test_oversized_body_with_content_length(app):
    response = call(app, "POST", "/v1/completions", json={"model": SERVED, **_big_prompt()})
    assert_error(response, 413, str(MAX_BODY_BYTES))
    assert_serving(app)


def test_oversized_body_without_content_length(app):
    """A chunked upload has no Content-Length; the limit still holds while the body streams in."""
    payload = json.dumps({"model": SERVED, **_big_prompt()}).encode()

    async def chunks():
        for i in range(0, len(payload), 1 << 20):
            yield payload[i:i + (1 << 20)]

    async def go():
        async with client(app) as c:
            return await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})

    response = asyncio.run(go())
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_error(response, 413, str(MAX_BODY_BYTES))
    assert_serving(app)


def test_unknown_route_and_method(app):
    assert_error(call(app, "GET", "/v1/no-such-endpoint"), 404)
    assert_error(call(app, "GET", "/v1/completions"), 405)
    assert_serving(app)


# ---------------------------------------------------------------------------------------------- API key


def test_api_key(secured_app):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY},
                    {"authorization": f"Basic {API_KEY}"}):
        response = call(secured_app, "POST", "/v1/completions", headers=headers,
                        json={"model": SERVED, "prompt": "Hi", "max_tokens": 2})
        assert_error(response, 401, "API key", code="invalid_api_key")
        assert_error(call(secured_app, "GET", "/v1/models", headers=headers), 401, "API key")
        assert_error(call(secured_app, "POST", "/v1/unload_lora_adapter", headers=headers,
                          json={"lora_name": DEMO[0]}), 401)
    # /health and /metrics stay open
    assert call(secured_app, "GET", "/health").status_code == 200
    assert call(secured_app, "GET", "/metrics").status_code == 200
    assert_serving(secured_app, authorization=f"Bearer {API_KEY}")
    ok = call(secured_app, "GET", "/v1/models", headers={"authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == SERVED


# ---------------------------------------------------------------------------------------------- models and adapters


def model_ids(app, **headers) -> list[str]:
    response = call(app, "GET", "/v1/models", headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert all(card["object"] == "model" for card in body["data"])
    return [card["id"] for card in body["data"]]


def test_models_lists_base_and_adapters(app):
    ids = model_ids(app)
    assert ids[0] == SERVED
    assert set(DEMO) <= set(ids[1:])
    cards = {c["id"]: c for c in call(app, "GET", "/v1/models").json()["data"]}
    assert cards[DEMO[0]]["parent"] == SERVED and cards[SERVED]["parent"] is None


def load(app, name: str, path, **headers) -> httpx.Response:
    return call(app, "POST", "/v1/load_lora_adapter", headers=headers, json={"lora_name": name, "lora_path": str(path)})


def unload(app, name: str, **headers) -> httpx.Response:
    return call(app, "POST", "/v1/unload_lora_adapter", headers=headers, json={"lora_name": name})


def greedy(app, model: str, prompt, max_tokens: int = 12, **extra) -> dict:
    response = call(app, "POST", "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_load_use_unload(app, engine, reference, adapter_dirs):
    for name in ("dense", "bd"):
        response = load(app, f"new-{name}", adapter_dirs[name])
        assert response.status_code == 200, response.text
        assert f"new-{name}" in response.text
        assert f"new-{name}" in model_ids(app)
        reference.add_adapter(f"new-{name}", adapter_dirs[name])
        got = greedy(app, f"new-{name}", "The adapter says", max_tokens=10)
        want = reference.generate(["The adapter says"], adapters=[f"new-{name}"], max_tokens=10)[0]
        assert got["choices"][0]["text"] == want.text
        assert got["usage"]["completion_tokens"] == len(want.token_ids)
        assert got["model"] == f"new-{name}"
    base = greedy(app, SERVED, "The adapter says", max_tokens=10)["choices"][0]["text"]
    assert greedy(app, "new-dense", "The adapter says", max_tokens=10)["choices"][0]["text"] != base

    for name in ("new-dense", "new-bd"):
        response = unload(app, name)
        assert response.status_code == 200, response.text
        assert name not in model_ids(app)
        assert_error(complete(app, model=name, prompt="Hi"), 404, name)
    # the name is free again
    assert load(app, "new-dense", adapter_dirs["dense"]).status_code == 200
    assert greedy(app, "new-dense", "Hi", max_tokens=3, ignore_eos=True)["usage"]["completion_tokens"] == 3
    assert unload(app, "new-dense").status_code == 200
    assert_serving(app)


def test_bad_adapter_loads(app, tmp_path, adapter_dirs):
    registered = model_ids(app)
    missing = tmp_path / "does-not-exist"
    assert_error(load(app, "x", missing), 400, str(missing), code="invalid_adapter")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(load(app, "x", empty), 400, str(empty), "adapter_config.json")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text("{not json")
    assert_error(load(app, "x", garbage), 400, str(garbage), "JSON")
    # rank 32 does not fit max_lora_rank=16
    assert_error(load(app, "x", adapter_dirs["big"]), 400, "32", "max_lora_rank")
    # names in use: an adapter and the base model
    assert_error(load(app, DEMO[0], adapter_dirs["dense"]), 400, DEMO[0])
    assert_error(load(app, SERVED, adapter_dirs["dense"]), 400, SERVED)
    # wrongly typed / missing fields
    assert_error(call(app, "POST", "/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path")
    assert_error(call(app, "POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": 5}), 400, "lora_path")
    assert_error(call(app, "POST", "/v1/unload_lora_adapter", json={}), 400, "lora_name")
    assert model_ids(app) == registered
    assert_error(complete(app, model="x", prompt="Hi"), 404, "'x'")
    assert_serving(app)
    assert_serving(app, model=DEMO[0])


def test_unload_unknown_adapter(app):
    assert_error(unload(app, "never-loaded"), 404, "never-loaded", code="adapter_not_found")
    assert_serving(app)


def test_lora_root(secured_app, engine, lora_root, adapter_dirs):
    auth = {"authorization": f"Bearer {API_KEY}"}
    # outside the root: another directory, a '..' escape, and a symlink inside the root pointing outside
    escape = lora_root / ".." / adapter_dirs["dense"].parent.name / "dense"
    link = lora_root / "link"
    link.symlink_to(adapter_dirs["dense"], target_is_directory=True)
    for path in (adapter_dirs["dense"], escape, link, Path(demo_adapters()[DEMO[0]])):
        response = load(secured_app, "rooted", path, **auth)
        assert_error(response, 403, str(path), str(lora_root), code="forbidden_path")
        assert "rooted" not in model_ids(secured_app, **auth)
    # inside the root it loads, serves and unloads
    inside = write_adapter(random_adapter(engine.model_config, "rooted", rank=2, seed=9),
                           lora_root / "sub" / "rooted")
    assert load(secured_app, "rooted", inside, **auth).status_code == 200
    assert_serving(secured_app, model="rooted", authorization=f"Bearer {API_KEY}")
    assert unload(secured_app, "rooted", **auth).status_code == 200
    # a bad directory inside the root is still a 400 that names it
    assert_error(load(secured_app, "rooted", lora_root / "nothing", **auth), 400, str(lora_root / "nothing"))
    assert_serving(secured_app, authorization=f"Bearer {API_KEY}")


# ---------------------------------------------------------------------------------------------- unload while in use


def call_spy(scheduler):
    """(event, stand-in for scheduler.call that sets the event once a command is queued)."""
    queued = threading.Event()
    real_call = scheduler.call

    def spy(fn, op=None):
        future = real_call(fn, op)
        queued.set()
        return future

    return queued, spy


def test_unload_adapter_of_running_request(app, scheduler, adapter_dirs, monkeypatch):
    """Unloading an adapter that a running request uses is refused (409) until the request has finished;
    the running request is not disturbed and completes, and afterwards the unload succeeds."""
    assert load(app, "held", adapter_dirs["dense"]).status_code == 200
    queued, spy = call_spy(scheduler)

    monkeypatch.setattr(scheduler, "call", spy)

    async def go():
        async with client(app) as c:
            long = asyncio.create_task(c.post("/v1/completions", json={
                "model": "held", "prompt": "Hold on", "max_tokens": MAX_SEQ_LEN - 10, "temperature": 0,
                "stream": True, "ignore_eos": True}))
            # freeze the scheduler at the first step boundary where the request runs (it cannot finish while
            # frozen), queue the unload, go on: the unload runs before the next step
            gate = await hold_when(scheduler, lambda: "held" in scheduler.generator.adapters_in_use())
            queued.clear()
            refused = asyncio.create_task(c.post("/v1/unload_lora_adapter", json={"lora_name": "held"}))
            await until(queued.is_set, "the unload command")
            gate.set()
            refused = await refused
            return refused, await long

    refused, long = asyncio.run(go())
    assert_error(refused, 409, "held", "running", code="adapter_in_use")
    assert long.status_code == 200
    chunks = sse_chunks(long.text)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "held" in model_ids(app)
    assert unload(app, "held").status_code == 200
    assert_serving(app)


def test_unload_adapter_of_waiting_request(app, scheduler, adapter_dirs, monkeypatch):
    """A request that was accepted but has not started yet also holds its adapter: the unload gets 409 and the
    request then runs normally."""
    assert load(app, "queued", adapter_dirs["bd"]).status_code == 200
    queued, spy = call_spy(scheduler)

    async def go():
        async with client(app) as c:
            gate, _held, _ = pause(scheduler)  # nothing runs until the gate opens
            request = asyncio.create_task(c.post("/v1/completions", json={
                "model": "queued", "prompt": "Wait for me", "max_tokens": 4, "temperature": 0,
                "ignore_eos": True}))
            await until(lambda: scheduler.counts()[1] == 1, "the request to be queued")
            monkeypatch.setattr(scheduler, "call", spy)
            refused = asyncio.create_task(c.post("/v1/unload_lora_adapter", json={"lora_name": "queued"}))
            await until(queued.is_set, "the unload command")
            gate.set()
            return await refused, await request

    refused, request = asyncio.run(go())
    monkeypatch.undo()
    assert_error(refused, 409, "queued", "waiting", code="adapter_in_use")
    assert request.status_code == 200, request.text
    assert request.json()["usage"]["completion_tokens"] == 4
    assert unload(app, "queued").status_code == 200
    assert_serving(app)


def test_request_whose_adapter_vanished_fails_alone(app, scheduler):
    """The one race an unload cannot see: a request validated against an adapter that is unregistered before the
    scheduler takes it. That request fails by itself (finish_reason "error"); the request beside it completes."""
    from bdlora_jax.engine.generator import Request
    from bdlora_jax.engine.sampler import SamplingParams

    events = []
    ghost = Request([72, 105], "vanished", SamplingParams(temperature=0.0, max_tokens=3),
                    on_token=lambda request, token: events.append(token))

    async def go():
        async with client(app) as c:
            gate, _held, _ = pause(scheduler)
            good = asyncio.create_task(c.post("/v1/completions", json={
                "model": SERVED, "prompt": "Beside it", "max_tokens": 6, "temperature": 0, "ignore_eos": True}))
            await until(lambda: scheduler.counts()[1] == 1, "the good request to be queued")
            scheduler.submit(ghost)
            gate.set()
            return await good

    before = settled_metrics(app, scheduler).get('bdlora_requests_finished_total{reason="error"}', 0.0)
    good = asyncio.run(go())
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["completion_tokens"] == 6
    assert ghost.finish_reason == "error" and events == [None] and ghost.output == []
    assert settled_metrics(app, scheduler)['bdlora_requests_finished_total{reason="error"}'] == before + 1
    assert_serving(app)


# ---------------------------------------------------------------------------------------------- outputs


PROMPTS = [("Hello, world", None), ([256, 72, 105, 33], DEMO[0]), ("Once upon a time", DEMO[-1]),
           ("abc " * 10, DEMO[1])]


def test_greedy_matches_engine_generate(app, reference):
    for prompt, adapter in PROMPTS:
        got = greedy(app, adapter or SERVED, prompt, max_tokens=16)
        want = reference.generate([prompt], adapters=[adapter], max_tokens=16)[0]
        assert got["choices"][0]["text"] == want.text, (prompt, adapter)
        assert got["choices"][0]["finish_reason"] == want.finish_reason
        assert got["usage"]["completion_tokens"] == len(want.token_ids)
    # nested ids, as OpenAI accepts a batch of one
    assert greedy(app, SERVED, [[72, 101]], max_tokens=5)["choices"][0]["text"] == \
        reference.generate([[72, 101]], max_tokens=5)[0].text


def test_streaming_equals_non_streaming(app):
    for prompt, adapter in PROMPTS:
        model = adapter or SERVED
        choice = greedy(app, model, prompt, max_tokens=20)["choices"][0]
        whole, finish = choice["text"], choice["finish_reason"]
        response = call(app, "POST", "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 20,
                                                              "temperature": 0, "stream": True})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(response.text)
        assert all(c["object"] == "text_completion" and c["model"] == model for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole
        assert chunks[-1]["choices"][0]["finish_reason"] == finish
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def _stop_string(text: str) -> str:
    """A two-character printable ASCII piece from the middle of `text`."""
    for k in range(len(text) // 3, len(text) - 2):
        piece = text[k:k + 2]
        if all(c.isascii() and c.isprintable() for c in piece):
            return piece
    pytest.skip(f"no printable ASCII pair in {text!r}")


def test_stop_strings(app, reference):
    full = greedy(app, DEMO[0], "Stop me", max_tokens=60, ignore_eos=True)["choices"][0]["text"]
    stop = _stop_string(full)
    cut = full[:full.find(stop)]
    for stream in (False, True):
        response = call(app, "POST", "/v1/completions", json={
            "model": DEMO[0], "prompt": "Stop me", "max_tokens": 60, "temperature": 0, "stop": [stop, "\x00never"],
            "stream": stream, "ignore_eos": True})
        assert response.status_code == 200
        if stream:
            chunks = sse_chunks(response.text)
            text, finish = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
        assert text == cut, (stop, full)
        assert finish == "stop"
    # a stop string as a plain string, and a stop token id
    assert greedy(app, DEMO[0], "Stop me", max_tokens=60, stop=stop, ignore_eos=True)["choices"][0]["text"] == cut
    ids = [72, 101, 108]
    tokens = reference.generate([ids], max_tokens=10, ignore_eos=True)[0].token_ids
    stopped = greedy(app, SERVED, ids, max_tokens=10, stop_token_ids=[tokens[3]], ignore_eos=True)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == tokens.index(tokens[3]) + 1
    assert_serving(app)


def test_seeded_sampling_is_reproducible(app):
    body = dict(prompt="Random", max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    first = complete(app, **body)
    second = complete(app, **body)
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]


def test_metrics(app, scheduler):
    before = settled_metrics(app, scheduler)
    assert before["bdlora_requests_running"] == 0 and before["bdlora_requests_waiting"] == 0
    assert before["bdlora_adapters_registered"] == len(model_ids(app)) - 1
    greedy(app, SERVED, "Count these", max_tokens=7, ignore_eos=True)
    greedy(app, DEMO[0], "Count these", max_tokens=7, ignore_eos=True)
    after = settled_metrics(app, scheduler)
    for name in METRIC_NAMES:
        assert any(key == name or key.startswith((name + "_", name + "{")) for key in after), name
    assert after["bdlora_generated_tokens_total"] - before["bdlora_generated_tokens_total"] == 14
    key = 'bdlora_requests_finished_total{reason="length"}'
    assert after[key] - before.get(key, 0) == 2
    for histogram in METRIC_NAMES[-3:]:  # the latency histograms observed each request once
        assert after[f"{histogram}_count"] - before[f"{histogram}_count"] == 2
        assert after[f"{histogram}_sum"] > before[f"{histogram}_sum"]
    assert after["bdlora_compilations"] >= after["bdlora_compilations_after_warmup"] >= 0
    assert after["bdlora_adapter_loads"] >= 1


def test_health(app):
    response = call(app, "GET", "/health")
    assert response.status_code == 200
