"""Live servers: `python -m bdlora_jax.serve --mesh 1x8` on 127.0.0.1 (a random free port), used through the official
`openai` client, for each strategy: completions, streaming, /v1/models, adapter load / use / unload. On the bdlora
server: 200 concurrent greedy requests over 20 adapters with max_loras=4 all complete and each equals the same
request run alone through Engine.generate; a client that disconnects mid-stream frees its row; and /metrics shows
zero compilations after warm-up through all of it.

Each server warms up (compiles every prefill bucket) before /health answers, so the three servers are started
together and their warm-ups overlap with the in-test reference engine's work. Under pytest-xdist (`-n 2`, whose
default `--dist load` may split this module over both workers) servers start lazily, only where a test needs one;
`--dist loadgroup` keeps the module on one worker (it is marked xdist_group "serve_live").
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from helpers import STRATEGIES
from prometheus_client.parser import text_string_to_metric_families

from bdlora_jax.demo import demo_adapters

pytestmark = [pytest.mark.xdist_group("serve_live"), pytest.mark.slow]

MESH = "1x8"
MAX_LORAS, MAX_LORA_RANK, MAX_BATCH, MAX_SEQ_LEN = 4, 16, 8, 128
# (max batch, max seq len) of each server: the bdlora server takes the concurrent workload (prompts of up to 100
# tokens); the others serve the basic prompts only (34 tokens with their completions), so they warm up fewer
# prefill buckets and prompt counts
LIMITS = {"bdlora": (MAX_BATCH, MAX_SEQ_LEN), "replicated": (4, 64), "slora": (4, 64)}
DEMO = sorted(demo_adapters())
SERVED = "demo"
START_TIMEOUT = 600.0  # generous: warm-up compiles every prefill bucket, and the host may be busy
N_LOADED, N_REQUESTS = 16, 200
BASIC_PROMPT = "Hello, live server"
BASIC_MODELS = (SERVED, DEMO[0], DEMO[-1])
LIVE_ADAPTERS = ("live-dense", "live-bd")


# ---------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    strategy: str
    log_path: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    healthy: bool = False

    def start(self) -> None:
        self.port = free_port()
        max_batch, max_seq_len = LIMITS[self.strategy]
        cmd = [sys.executable, "-m", "bdlora_jax.serve", "--mesh", MESH, "--strategy", self.strategy,
               "--host", "127.0.0.1", "--port", str(self.port), "--max-loras", str(MAX_LORAS),
               "--max-lora-rank", str(MAX_LORA_RANK), "--max-batch", str(max_batch), "--max-seq-len", str(max_seq_len)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.log_path.parent)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_healthy(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT
        retried = False
        while not self.healthy:
            if self.proc.poll() is not None:
                if not retried and "address already in use" in self.log().lower():
                    retried = True  # another process took the free port in between: try a new one
                    self.start()
                    continue
                pytest.fail(f"{self.strategy} server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            assert time.monotonic() < deadline, f"{self.strategy} server not healthy:\n{self.log()[-4000:]}"
            try:
                self.healthy = httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                pass
            if not self.healthy:
                time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=600)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=600)

    def metrics(self) -> dict[str, float]:
        response = httpx.get(f"{self.url}/metrics", timeout=30)
        assert response.status_code == 200
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        samples["_text"] = response.text
        return samples

    def wait_metrics(self, predicate, timeout: float = 120.0) -> dict[str, float]:
        """Poll /metrics until predicate holds (or the timeout passes); returns the last reading."""
        deadline = time.monotonic() + timeout
        while not predicate(now := self.metrics()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return now

    def assert_no_compilations_after_warmup(self) -> None:
        text = self.metrics()["_text"]
        assert "bdlora_compilations_after_warmup 0.0" in text.splitlines(), text

    def assert_clean_log(self) -> None:
        log = self.log()
        assert "Traceback" not in log and "generation step failed" not in log, log[-4000:]


class Servers:
    """The three servers of this module, started together (or one by one when tests may run on several workers)."""

    def __init__(self, root: Path, eager: bool):
        self.root, self.eager = root, eager
        self.servers = {s: Server(s, root / f"server-{s}.log") for s in STRATEGIES}

    def start(self, strategy: str) -> None:
        if self.servers[strategy].proc is None:
            self.servers[strategy].start()

    def get(self, strategy: str) -> Server:
        self.start(strategy)
        return self.servers[strategy].wait_healthy()

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory):
    # under pytest-xdist the other worker keeps the cores busy, and with `--dist load` this module's tests may be
    # split over both workers: start servers only when a test asks for one
    registry = Servers(tmp_path_factory.mktemp("servers"), eager="PYTEST_XDIST_WORKER" not in os.environ)
    request.addfinalizer(registry.stop_all)
    if registry.eager:
        for strategy in STRATEGIES:
            registry.start(strategy)
    return registry


# ---------------------------------------------------------------------------------------------- workload


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    """Random PEFT adapters: 16 for the concurrency test (dense rank 2, and BD-LoRA with 8 blocks of rank 2 =
    rank 16, both within max_lora_rank 16 on 8 devices) and two for the load / unload test."""
    from bdlora_jax.adapters.peft_io import write_adapter
    from bdlora_jax.adapters.synthetic import random_adapter
    from bdlora_jax.checkpoint import load_model_config
    from bdlora_jax.demo import MODEL_DIR

    config = load_model_config(MODEL_DIR)
    root = tmp_path_factory.mktemp("live_adapters")
    specs = {f"conc-{i:02d}": dict(rank=2) if i % 2 == 0 else dict(rank=16, nblocks=8) for i in range(N_LOADED)}
    specs.update({"live-dense": dict(rank=2), "live-bd": dict(rank=16, nblocks=8)})
    return {name: write_adapter(random_adapter(config, name, seed=100 + i, **spec), root / name)
            for i, (name, spec) in enumerate(specs.items())}


def _prompt(i: int) -> str | list[int]:
    length = 1 + (i * 37) % 100  # 1..100 tokens: every prefill bucket (16, 32, 64, 128)
    text = (f"Request {i}: the quick brown fox jumps over the lazy dog. " * 3)[:length]
    return list(text.encode()) if i % 10 == 3 else text  # some as token ids


@dataclass
class Workload:
    """The concurrent requests, and what Engine.generate gives for each request run alone."""

    requests: list[tuple[str, str | list[int], int]]  # (model, prompt, max_tokens)
    expected: list[tuple[str, int, str]] = field(default_factory=list)  # (text, tokens, finish_reason) per request
    basic: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # model -> the same for BASIC_PROMPT


@pytest.fixture(scope="module")
def workload(servers, adapter_dirs) -> Workload:
    """References from an in-test Engine with the bdlora server's model, mesh, strategy, limits and adapters.

    Asked for right after the servers were started, so this work overlaps with their warm-ups."""
    from bdlora_jax import Engine

    engine = Engine.from_pretrained("demo", mesh=MESH, strategy="bdlora", max_loras=MAX_LORAS,
                                    max_lora_rank=MAX_LORA_RANK, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN)
    for name, path in {**demo_adapters(), **adapter_dirs}.items():
        engine.add_adapter(name, path)
    names = sorted(n for n in adapter_dirs if n.startswith("conc-")) + DEMO
    assert len(names) == 20
    work = Workload([(names[i % len(names)], _prompt(i), 2 + i % 5) for i in range(N_REQUESTS)])
    for model, prompt, max_tokens in work.requests:  # each one alone
        [done] = engine.generate([prompt], adapters=[model], max_tokens=max_tokens, temperature=0.0)
        work.expected.append((done.text, len(done.token_ids), done.finish_reason))
    for model in BASIC_MODELS + LIVE_ADAPTERS:
        [done] = engine.generate([BASIC_PROMPT], adapters=[None if model == SERVED else model], max_tokens=16)
        work.basic[model] = (done.text, len(done.token_ids), done.finish_reason)
    return work


@pytest.fixture(scope="module", params=STRATEGIES)
def server(request, servers) -> Server:
    if request.param == "bdlora" or servers.eager:
        request.getfixturevalue("workload")  # while the servers warm up
    return servers.get(request.param)


@pytest.fixture(scope="module")
def bdlora_server(servers, workload) -> Server:
    return servers.get("bdlora")


def load(server: Server, name: str, path: Path) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      timeout=120)


def unload(server: Server, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=120)


# ---------------------------------------------------------------------------------------------- every strategy


def reference(request, strategy: str) -> Workload | None:
    """The Engine.generate references, for the bdlora server (same model, mesh, strategy as the reference engine)."""
    return request.getfixturevalue("workload") if strategy == "bdlora" else None


def test_models_completions_streaming(server, request):
    workload = reference(request, server.strategy)
    client = server.client()
    ids = [m.id for m in client.models.list()]
    assert ids[0] == SERVED and set(DEMO) <= set(ids[1:])
    for model in BASIC_MODELS:
        whole = client.completions.create(model=model, prompt=BASIC_PROMPT, max_tokens=16, temperature=0)
        assert whole.model == model and whole.object == "text_completion"
        assert whole.usage.prompt_tokens == len(BASIC_PROMPT)
        text, finish = whole.choices[0].text, whole.choices[0].finish_reason
        assert (finish, whole.usage.completion_tokens) == ("length", 16) or finish == "stop"
        if workload is not None:
            assert (text, whole.usage.completion_tokens, finish) == workload.basic[model], model
        chunks = list(client.completions.create(model=model, prompt=BASIC_PROMPT, max_tokens=16, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text, model
        assert chunks[-1].choices[0].finish_reason == finish
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        assert len({c.id for c in chunks}) == 1
        # the same prompt as token ids gives the same text
        by_ids = client.completions.create(model=model, prompt=list(BASIC_PROMPT.encode()), max_tokens=16,
                                           temperature=0)
        assert by_ids.choices[0].text == text
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=SERVED, prompt="Hi", max_tokens=0)
    assert client.completions.create(model=SERVED, prompt="Hi", max_tokens=2,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    server.assert_no_compilations_after_warmup()
    server.assert_clean_log()


def test_load_use_unload_adapter(server, adapter_dirs, request):
    workload = reference(request, server.strategy)
    client = server.client()
    for name in LIVE_ADAPTERS:
        response = load(server, name, adapter_dirs[name])
        assert response.status_code == 200, response.text
        assert name in [m.id for m in client.models.list()]
        out = client.completions.create(model=name, prompt=BASIC_PROMPT, max_tokens=16, temperature=0)
        assert out.model == name
        if workload is not None:
            assert (out.choices[0].text, out.usage.completion_tokens, out.choices[0].finish_reason) == \
                workload.basic[name], name
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=name, prompt=BASIC_PROMPT, max_tokens=16, temperature=0, stream=True))
        assert streamed == out.choices[0].text
    for name in LIVE_ADAPTERS:
        response = unload(server, name)
        assert response.status_code == 200, response.text
        assert name not in [m.id for m in client.models.list()]
        with pytest.raises(openai.NotFoundError, match=name):
            client.completions.create(model=name, prompt="Hi", max_tokens=2)
    # unloading again: 404 with an OpenAI error body
    response = unload(server, LIVE_ADAPTERS[0])
    assert response.status_code == 404 and LIVE_ADAPTERS[0] in response.json()["error"]["message"]
    assert client.completions.create(model=DEMO[0], prompt="Hi", max_tokens=2,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    server.assert_no_compilations_after_warmup()
    server.assert_clean_log()


# ---------------------------------------------------------------------------------------------- bdlora server


def test_200_concurrent_requests_over_20_adapters(bdlora_server, workload, adapter_dirs):
    server = bdlora_server
    for name, path in adapter_dirs.items():
        if name.startswith("conc-"):
            response = load(server, name, path)
            assert response.status_code == 200, response.text
    before = server.metrics()
    assert {m.id for m in server.client().models.list()} >= {model for model, _, _ in workload.requests}

    async def run_all():
        client = server.async_client()
        try:
            return await asyncio.gather(*[
                client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
                for model, prompt, max_tokens in workload.requests
            ])
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert len(results) == N_REQUESTS
    mismatches = []
    for i, (result, (model, prompt, max_tokens), expected) in enumerate(
            zip(results, workload.requests, workload.expected)):
        assert result.model == model
        got = (result.choices[0].text, result.usage.completion_tokens, result.choices[0].finish_reason)
        if got != expected:
            mismatches.append((i, model, len(prompt), max_tokens, got, expected))
    assert not mismatches, f"{len(mismatches)} of {N_REQUESTS} differ from Engine.generate alone: {mismatches[:5]}"

    # a response can arrive just before the scheduler books its last step: wait for the books to close
    reasons = [f'bdlora_requests_finished_total{{reason="{r}"}}' for r in ("length", "stop")]

    def finished(m: dict) -> float:
        return sum(m.get(r, 0.0) for r in reasons)

    after = server.wait_metrics(lambda m: finished(m) >= finished(before) + N_REQUESTS)
    assert after["bdlora_requests_running"] == 0 and after["bdlora_requests_waiting"] == 0
    assert finished(after) - finished(before) == N_REQUESTS
    generated = sum(n_tokens for _, n_tokens, _ in workload.expected)
    assert after["bdlora_generated_tokens_total"] - before["bdlora_generated_tokens_total"] == generated
    # 20 adapters through 4 slots: every adapter was written into a slot, and some were evicted
    assert after["bdlora_adapter_loads"] - before["bdlora_adapter_loads"] >= 20
    assert after["bdlora_adapter_evictions"] > before["bdlora_adapter_evictions"]
    server.assert_no_compilations_after_warmup()
    server.assert_clean_log()


def test_client_disconnect_mid_stream_frees_its_row(bdlora_server):
    server = bdlora_server
    abort = 'bdlora_requests_finished_total{reason="abort"}'
    before = server.metrics().get(abort, 0.0)
    client = server.client()
    stream = client.completions.create(model=DEMO[1], prompt="Talk for a long time", temperature=0,
                                       max_tokens=MAX_SEQ_LEN - 30, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    stream.close()  # the client goes away mid-stream

    now = server.wait_metrics(lambda m: m.get(abort, 0.0) >= before + 1 and m["bdlora_requests_running"] == 0)
    assert now.get(abort, 0.0) == before + 1, f"the disconnected request was not aborted: {now['_text']}"
    assert now["bdlora_requests_running"] == 0 and now["bdlora_requests_waiting"] == 0
    out = client.completions.create(model=DEMO[1], prompt="Still there?", max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"
    server.assert_no_compilations_after_warmup()
    server.assert_clean_log()


# ---------------------------------------------------------------------------------------------- idle sockets, SIGTERM


def test_idle_connections_closed_and_sigterm_drains(tmp_path):
    """A small server of its own (mesh 1x1, one decode row): 50 connections sending half a request are closed after
    --request-timeout; on SIGTERM the streams in flight (running or waiting) run to [DONE], a new request gets 503
    with an error body, and the process exits 0."""
    import signal

    server = Server("bdlora", tmp_path / "server-drain.log")
    server.port = free_port()
    cmd = [sys.executable, "-m", "bdlora_jax.serve", "--mesh", "1x1", "--host", "127.0.0.1", "--port",
           str(server.port), "--max-batch", "1", "--max-seq-len", "256", "--request-timeout", "1",
           "--shutdown-timeout", "60"]
    with open(server.log_path, "ab") as log:
        server.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        server.wait_healthy()
        halves = [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le", b"POST /v1/comp", b"",
                  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"model\": "]
        sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
        for i, sock in enumerate(sockets):
            sock.sendall(halves[i % len(halves)])
        for sock in sockets:
            sock.settimeout(20)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
            sock.close()

        # Long enough that four streams are in flight for well over a metrics poll (0.1 s): on a fast CPU the demo
        # decodes a token in about 2 ms, and six 28-token streams were all done within 0.4 s.
        body = {"model": SERVED, "prompt": "Hi", "max_tokens": 240, "temperature": 0, "stream": True}

        async def streams_through_sigterm() -> list[list[str]]:
            """Six streams in flight (one decode row: they run one after another) when SIGTERM arrives."""
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
                async def stream() -> list[str]:
                    async with c.stream("POST", "/v1/completions", json=body) as s:
                        assert s.status_code == 200
                        return [line async for line in s.aiter_lines() if line.startswith("data: ")]

                streams = [asyncio.create_task(stream()) for _ in range(6)]
                in_flight = await asyncio.to_thread(server.wait_metrics, lambda m: m["bdlora_requests_running"]
                                                    + m["bdlora_requests_waiting"] >= 4)
                assert in_flight["bdlora_requests_waiting"] >= 3, in_flight
                server.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 30
                while (refused := await c.post("/v1/completions", json=body)).status_code != 503:
                    assert time.monotonic() < deadline, refused.text  # the signal may take a moment to arrive
                    await asyncio.sleep(0.05)
                error = refused.json()["error"]
                assert error["code"] == "shutting_down" and "shutting down" in error["message"], error
                return await asyncio.gather(*streams)

        for lines in asyncio.run(streams_through_sigterm()):
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=60) == 0, server.log()[-4000:]
        server.assert_clean_log()
    finally:
        server.stop()
