"""A server over the paged KV cache (uvicorn in a thread, the official `openai` client): 200 concurrent greedy requests
over the demo adapters with a page pool too small for them at once all complete, each equal to the same request run
alone on the contiguous cache, with preemptions shown in /metrics; a client that disconnects mid-stream returns its
pages; and nothing compiles after warm-up."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from test_serve_requests import free_port

from bdlora_jax import Engine
from bdlora_jax.demo import demo_adapters
from bdlora_jax.engine.generator import Request
from bdlora_jax.engine.sampler import SamplingParams
from bdlora_jax.engine.scheduler import Scheduler
from bdlora_jax.server import create_app

pytestmark = pytest.mark.xdist_group("serve_paged")

LIMITS = dict(mesh="1x1", strategy="bdlora", max_loras=2, max_lora_rank=16, max_batch=8, max_seq_len=128)
PAGED = dict(kv_cache="paged", page_size=32, num_pages=5, max_num_batched_tokens=32)  # 160 tokens for 8 rows
DEMO = sorted(demo_adapters())
N_REQUESTS = 200


def _prompt(i: int) -> str:
    return (f"Request {i}: the quick brown fox jumps over the lazy dog. " * 3)[:20 + (i * 37) % 80]


def _engine(**config) -> Engine:
    engine = Engine.from_pretrained("demo", **{**LIMITS, **config})
    for name, path in demo_adapters().items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def workload() -> list[tuple[str | None, str, int, str]]:
    """(adapter, prompt, max_tokens, expected text) of every request, the text from the contiguous cache alone (one
    row: nothing else can run with it)."""
    engine = _engine(max_batch=1)
    requests = [([None, *DEMO][i % (len(DEMO) + 1)], _prompt(i), 3 + i % 6) for i in range(N_REQUESTS)]
    out = []
    for adapter, prompt, max_tokens in requests:
        [done] = engine.generate([prompt], adapters=[adapter], max_tokens=max_tokens, ignore_eos=True)
        out.append((adapter, prompt, max_tokens, done.text))
    return out


@pytest.fixture(scope="module")
def served():
    """(url, scheduler) of a paged server on the demo adapters."""
    engine = _engine(**PAGED)
    scheduler = Scheduler(engine)
    scheduler.warm_up()
    scheduler.start()
    app = create_app(engine, scheduler, "demo")
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", scheduler
    http.should_exit = True
    thread.join(timeout=30)
    scheduler.stop()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def _settled(url: str) -> dict[str, float]:
    """/metrics once no request runs or waits (a response can arrive just before the scheduler books its step)."""
    deadline = time.monotonic() + 60
    while (m := _metrics(url))["bdlora_requests_running"] or m["bdlora_requests_waiting"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    return m


def test_200_concurrent_requests_through_a_small_page_pool_equal_each_request_alone(workload, server):
    before = _metrics(server)

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=600) as client:
            return await asyncio.gather(*[
                client.completions.create(model=adapter or "demo", prompt=prompt, max_tokens=max_tokens,
                                          temperature=0, extra_body={"ignore_eos": True})
                for adapter, prompt, max_tokens, _ in workload])

    results = asyncio.run(run_all())
    mismatches = [(i, result.choices[0].text, text) for i, (result, (*_, text)) in enumerate(zip(results, workload))
                  if result.choices[0].text != text]
    assert not mismatches, f"{len(mismatches)} of {N_REQUESTS} differ from the request alone: {mismatches[:3]}"
    after = _settled(server)
    assert after["bdlora_preemptions"] > before["bdlora_preemptions"]  # the pool could not hold them all
    assert after["bdlora_kv_pages_total"] == PAGED["num_pages"] and after["bdlora_kv_pages_used"] == 0
    assert after["bdlora_compilations_after_warmup"] == 0


def _pause_once_running(scheduler: Scheduler, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(paused, resume): after the first step that leaves a request running, the scheduler thread waits until resume
    is set."""
    paused, resume = threading.Event(), threading.Event()
    step = scheduler.generator.step

    def step_then_pause():
        finished = step()
        if scheduler.generator.running and not paused.is_set():
            paused.set()
            resume.wait(timeout=120)
        return finished

    monkeypatch.setattr(scheduler.generator, "step", step_then_pause)
    return paused, resume


def test_a_client_that_disconnects_returns_its_pages(served, monkeypatch):
    """The scheduler is held between steps from the stream's first token until the server has seen the disconnect,
    so the stream can neither finish first nor be counted before its abort is booked."""
    server, scheduler = served
    abort = 'bdlora_requests_finished_total{reason="abort"}'
    aborted = _metrics(server).get(abort, 0.0)
    seen = threading.Event()
    cancel = scheduler.cancel
    monkeypatch.setattr(scheduler, "cancel", lambda request: (cancel(request), seen.set()))
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=600) as client:
        paused, resume = _pause_once_running(scheduler, monkeypatch)
        stream = client.completions.create(model=DEMO[0], prompt="Talk for a long time", temperature=0,
                                           max_tokens=100, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        assert paused.wait(timeout=60)
        assert _metrics(server)["bdlora_kv_pages_used"] > 0
        stream.close()
        assert seen.wait(timeout=60)
        resume.set()
        deadline = time.monotonic() + 60
        while _metrics(server).get(abort, 0.0) < aborted + 1:
            assert time.monotonic() < deadline, "the disconnected stream was never aborted"
            time.sleep(0.05)
        after = _settled(server)
        assert after[abort] == aborted + 1 and after["bdlora_kv_pages_used"] == 0
        out = client.completions.create(model=DEMO[0], prompt="Still there?", max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    assert _metrics(server)["bdlora_compilations_after_warmup"] == 0


def test_a_cancelled_request_is_booked_before_the_next_step(served, monkeypatch):
    """A cancellation ends its request between steps: when the next step starts, /metrics already counts it as aborted
    and no longer running (it used to show as neither for the length of that step)."""
    _, scheduler = served
    generator = scheduler.generator

    def aborted() -> float:
        return scheduler.metrics.registry.get_sample_value("bdlora_requests_finished_total", {"reason": "abort"}) or 0.0

    def running_ids() -> set[int]:
        return {request.id for request in generator.running.values()}

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    keeper, victim = Request([5, 6, 7], None, params), Request([8, 9, 10], None, params)
    before = aborted()
    both_running, resume, at_step = threading.Event(), threading.Event(), []
    step = generator.step

    def held_and_recorded_step():
        if victim.cancelled:  # what /metrics reads as a step after the cancellation starts
            at_step.append((victim.id in running_ids(), aborted()))
        finished = step()
        if {keeper.id, victim.id} <= running_ids() and not both_running.is_set():
            both_running.set()
            resume.wait(timeout=120)
        return finished

    monkeypatch.setattr(generator, "step", held_and_recorded_step)
    scheduler.submit(keeper)
    scheduler.submit(victim)
    assert both_running.wait(timeout=60)
    scheduler.cancel(victim)
    resume.set()
    deadline = time.monotonic() + 60
    while keeper.finish_reason is None:
        assert time.monotonic() < deadline, "the request beside the cancelled one never finished"
        time.sleep(0.05)
    assert victim.finish_reason == "abort" and keeper.finish_reason == "length"
    assert at_step and at_step[0] == (False, before + 1)
