"""A two-process server (2 processes × 4 CPU devices, `--mesh 1x8 --strategy bdlora`, jax.distributed over gloo):
started through bdlora_jax.launch it answers the official `openai` client with the greedy completions of a
single-process `--mesh 1x8` server, loads and unloads an adapter at runtime on both processes, and compiles nothing
after warm-up on either. Started by hand (no launcher to stop the others): a follower killed with SIGKILL, or
frozen with SIGSTOP, mid-stream makes process 0 fail its requests with 503 peer_lost and exit non-zero within
--peer-timeout; on `--mesh 2x4` (batch rows split over the processes) the answers are still the single-process
server's, and a killed process 0 makes the follower exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from bdlora_jax.demo import demo_adapters
from bdlora_jax.launch import free_port

pytestmark = [pytest.mark.xdist_group("multihost_serve"), pytest.mark.slow]

LIMITS = ["--strategy", "bdlora", "--max-loras", "4", "--max-lora-rank", "16"]
SERVED = ["--max-batch", "2", "--max-seq-len", "64"]  # the launched server: one request at a time
STREAMING = ["--max-batch", "1", "--max-seq-len", "128"]  # the servers a process of which is killed mid-stream
PROMPT = "Hello, two processes"
START_TIMEOUT = 600.0
PEER_TIMEOUT = 20


def wait_healthy(url: str, procs: list[subprocess.Popen], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert all(p.poll() is None for p in procs), log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _serve(command: list[str], log: Path):
    """Start a server command with its output in `log`; yield its base url once healthy, stop it afterwards."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", *command, "--mesh", "1x8", *LIMITS, *SERVED, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The two-process server through the launcher: (base url, log path)."""
    log = tmp_path_factory.mktemp("launched") / "server.log"
    yield from ((url, log) for url in _serve(["bdlora_jax.launch", "--num-processes", "2",
                                                "--cpu-devices-per-process", "4", "--", "serve"], log))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: a single-process server with the same model, mesh, strategy, limits and adapters."""
    yield from _serve(["bdlora_jax.serve"], tmp_path_factory.mktemp("single") / "server.log")


def _greedy(url: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text


def _sampled(url: str, model: str):
    """A seeded top-p completion with log-probabilities (what the leader relays: tokens and log-probabilities)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9, seed=7,
                                     logprobs=2).choices[0]


def _load(url: str, name: str, path: Path) -> None:
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      timeout=120).status_code == 200


def test_two_processes_answer_the_openai_client_as_one_process_does(launched, single, tmp_path):
    from bdlora_jax.adapters.peft_io import write_adapter
    from bdlora_jax.adapters.synthetic import random_adapter
    from bdlora_jax.checkpoint import resolve_model_config

    url, log = launched
    for model in ["demo", *sorted(demo_adapters())]:
        assert _greedy(url, model) == _greedy(single, model), model

    live = write_adapter(random_adapter(resolve_model_config("demo"), "live-bd", rank=16, nblocks=8, seed=5),
                         tmp_path / "live-bd")
    _load(single, "live-bd", live)
    _load(url, "live-bd", live)
    assert _greedy(url, "live-bd") == _greedy(single, "live-bd")
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "live-bd"}, timeout=120).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _greedy(url, "live-bd")
    first = min(demo_adapters())
    assert _greedy(url, first) == _greedy(single, first)  # both processes still in step
    got, want = _sampled(url, first), _sampled(single, first)
    assert got.text == want.text and got.logprobs.tokens == want.logprobs.tokens
    assert got.logprobs.token_logprobs == pytest.approx(want.logprobs.token_logprobs, abs=1e-4)

    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and [f["process_id"] for f in health["followers"]] == [1]
    assert health["followers"][0]["compilations_after_warmup"] == 0
    assert "bdlora_compilations_after_warmup 0.0" in httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
    assert "Traceback" not in log.read_text(errors="replace")


def _start_by_hand(tmp_path: Path, mesh: str = "1x8") -> tuple[str, list[subprocess.Popen], Path]:
    """Process 0 and 1 of a server started without the launcher: (url, [leader, follower], log); long enough
    sequences that a stream is still going when a process is killed."""
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "BDLORA_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "BDLORA_NUM_PROCESSES": "2",
           "BDLORA_CPU_DEVICES_PER_PROCESS": "4", "JAX_PLATFORMS": "cpu"}
    procs = []
    with log.open("ab") as out:
        for pid in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bdlora_jax.serve", "--mesh", mesh, *LIMITS, *STREAMING, "--port", str(port),
                 "--peer-timeout", str(PEER_TIMEOUT)],
                env={**env, "BDLORA_PROCESS_ID": str(pid)}, stdout=out, stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, procs, log)
    return url, procs, log


@pytest.mark.parametrize("lose", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_follower_fails_the_streams_with_503_and_process_0_exits(tmp_path, lose):
    url, (leader, follower), log = _start_by_hand(tmp_path)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json={"model": "demo", "prompt": PROMPT, "max_tokens": 100, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # tokens are flowing
            lost = time.monotonic()
            follower.send_signal(lose)
            rest = list(lines)
        assert any('"peer_lost"' in line for line in rest), rest[-5:]
        assert leader.wait(timeout=PEER_TIMEOUT + 30) != 0
        assert time.monotonic() - lost < PEER_TIMEOUT + 30
        noticed = log.read_text(errors="replace")  # by the channel, or by the watchdog of a step stuck in gloo
        assert "follower process 1" in noticed or "has not finished" in noticed
    finally:
        stop([leader, follower])


def test_rows_split_over_processes_and_a_killed_process_0_makes_the_follower_exit(tmp_path, single):
    """On `--mesh 2x4` each process holds half the batch rows: process 0 gathers the sampled ones (the follower
    joins the gather) and relays them; the answers are still the single-process 1x8 server's."""
    url, (leader, follower), log = _start_by_hand(tmp_path, mesh="2x4")
    try:
        first = min(demo_adapters())
        assert _greedy(url, first) == _greedy(single, first)
        got, want = _sampled(url, first), _sampled(single, first)
        assert got.text == want.text and got.logprobs.tokens == want.logprobs.tokens
        leader.send_signal(signal.SIGKILL)
        assert follower.wait(timeout=PEER_TIMEOUT + 30) != 0
        assert "leader (process 0)" in log.read_text(errors="replace")
    finally:
        stop([leader, follower])
