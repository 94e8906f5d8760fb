"""`bench load`: its workload (arrivals, lengths, adapter assignment, the JSONL dataset), its statistics and goodput
on known inputs, and whole runs over HTTP against this project's server served on 127.0.0.1 (the demo model, two
demo adapters): every request completes with exactly the tokens asked for, the JSON and the sweep's plot are
written, an unreachable server fails every request quickly with a clear error, and /metrics has the latency
histograms with one observation per finished request."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from helpers import running_scheduler
from prometheus_client.parser import text_string_to_metric_families

from bdlora_jax import Engine
from bdlora_jax.bench.cli import build_parser
from bdlora_jax.bench.cli import main as bench_main
from bdlora_jax.bench.load import run as run_load_command
from bdlora_jax.bench.load_client import send_request
from bdlora_jax.bench.load_metrics import (
    RequestRecord,
    distribution_ms,
    parse_goodput,
    peak_concurrency,
    peak_overlap,
    summarize,
)
from bdlora_jax.bench.load_workload import (
    WorkItem,
    arrival_offsets,
    assign_adapters,
    random_workload,
    read_dataset,
    sample_lengths,
)
from bdlora_jax.demo import demo_adapters

pytestmark = pytest.mark.xdist_group("bench_load")  # one worker builds the module's served engine once

ADAPTERS = ("caesar", "upper")  # the rank-2 demo adapters
HISTOGRAMS = ("bdlora_time_to_first_token_seconds", "bdlora_time_per_output_token_seconds",
              "bdlora_e2e_request_latency_seconds")

# ------------------------------------------------------------------------------------------------ workload


def test_poisson_arrivals_have_mean_gap_one_over_rate_and_are_seeded():
    offsets = arrival_offsets(20000, 4.0, 1.0, np.random.default_rng(0))
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    np.testing.assert_array_equal(offsets, arrival_offsets(20000, 4.0, 1.0, np.random.default_rng(0)))


def test_gamma_arrivals_keep_the_mean_and_burstiness_sets_the_spread():
    for shape in (0.25, 4.0):
        gaps = np.diff(arrival_offsets(20000, 2.0, shape, np.random.default_rng(1)))
        assert gaps.mean() == pytest.approx(0.5, rel=0.05)
        # gamma(shape k, mean m): coefficient of variation 1/sqrt(k)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(shape), rel=0.05)


def test_infinite_rate_sends_everything_at_once_and_bad_rates_are_refused():
    assert arrival_offsets(5, float("inf"), 1.0, np.random.default_rng(0)).tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="--request-rate"):
        arrival_offsets(5, 0.0, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="--burstiness"):
        arrival_offsets(5, 1.0, 0.0, np.random.default_rng(0))


def test_lengths_are_uniform_within_the_range():
    lengths = sample_lengths(5000, 20, 0.5, np.random.default_rng(0))
    assert lengths.min() == 10 and lengths.max() == 30
    assert lengths.mean() == pytest.approx(20, rel=0.03)
    assert sample_lengths(10, 7, 0.0, np.random.default_rng(0)).tolist() == [7] * 10
    assert sample_lengths(1000, 1, 0.9, np.random.default_rng(0)).min() >= 1
    with pytest.raises(ValueError, match="--range-ratio"):
        sample_lengths(1, 8, 1.0, np.random.default_rng(0))


def test_output_lengths_take_their_own_range_ratio_or_the_inputs():
    both = random_workload(500, 40, 20, 0.5, 100, np.random.default_rng(0))
    assert len({len(item.prompt) for item in both}) > 1 and len({item.max_tokens for item in both}) > 1
    fixed = random_workload(500, 40, 20, 0.5, 100, np.random.default_rng(0), output_range_ratio=0.0)
    assert {item.max_tokens for item in fixed} == {20}
    assert min(len(item.prompt) for item in fixed) == 20 and max(len(item.prompt) for item in fixed) == 60


def test_adapter_assignment_round_robin_random_and_zipf():
    names = ["a", "b", "c", "d"]
    assert assign_adapters(names, 6, "round-robin", np.random.default_rng(0)) == ["a", "b", "c", "d", "a", "b"]
    rand = assign_adapters(names, 4000, "random", np.random.default_rng(0))
    assert rand == assign_adapters(names, 4000, "random", np.random.default_rng(0))
    assert all(abs(rand.count(n) / 4000 - 0.25) < 0.03 for n in names)
    zipf = assign_adapters(names, 4000, "zipf", np.random.default_rng(0), zipf_alpha=1.0)
    assert zipf == assign_adapters(names, 4000, "zipf", np.random.default_rng(0), zipf_alpha=1.0)
    counts = [zipf.count(n) for n in names]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] / 4000 == pytest.approx(1 / (1 + 1 / 2 + 1 / 3 + 1 / 4), abs=0.03)  # 0.48
    steeper = assign_adapters(names, 4000, "zipf", np.random.default_rng(0), zipf_alpha=2.0)
    assert steeper.count("a") > zipf.count("a")
    with pytest.raises(ValueError, match="--lora-assignment"):
        assign_adapters(names, 2, "lru", np.random.default_rng(0))


def test_dataset_reader_takes_text_or_ids_and_names_file_line_and_field(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello"}\n\n{"prompt": [1, 2, 3], "max_tokens": 5, "model": "upper"}\n')
    items = read_dataset(path, 7)
    assert [(i.prompt, i.max_tokens, i.model, i.prompt_len) for i in items] == [
        ("hello", 7, None, None), ([1, 2, 3], 5, "upper", 3)]
    for line, fragment in [("not json", f"{path}:2: not a JSON object"),
                           ("[1, 2]", f"{path}:2: expected a JSON object"),
                           ('{"max_tokens": 3}', f"{path}:2: field 'prompt'"),
                           ('{"prompt": [1, "x"]}', f"{path}:2: field 'prompt'"),
                           ('{"prompt": "a", "max_tokens": 0}', f"{path}:2: field 'max_tokens'"),
                           ('{"prompt": "a", "model": 3}', f"{path}:2: field 'model'")]:
        path.write_text('{"prompt": "ok"}\n' + line + "\n")
        with pytest.raises(ValueError) as info:
            read_dataset(path, 4)
        assert fragment in str(info.value)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        read_dataset(path, 4)


# ---------------------------------------------------------------------------------------------- statistics


def record(ttft: float, e2el: float, tokens: int, itl=(), error=None) -> RequestRecord:
    return RequestRecord("m", prompt_tokens=10, output_tokens=tokens, ttft=ttft, itl=list(itl), e2el=e2el, error=error)


def test_distribution_on_known_inputs():
    d = distribution_ms([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert d == pytest.approx({"mean": 50.5, "median": 50.5, "p90": 90.1, "p99": 99.01})
    assert distribution_ms([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_summary_throughputs_tpot_and_goodput():
    records = [record(0.1, 1.1, 11, itl=[0.1] * 10), record(0.3, 0.3, 1), record(0.2, 2.2, 5, itl=[0.5] * 4),
               RequestRecord("m", error="HTTP 400: bad"), RequestRecord("m", error="HTTP 400: bad")]
    assert [r.tpot for r in records[:3]] == pytest.approx([0.1, 0.0, 0.5])
    summary = summarize(records, 2.0, parse_goodput(["ttft:250", "tpot:200"]))
    assert (summary["completed"], summary["failed"]) == (3, 2)
    assert summary["errors"] == [{"error": "HTTP 400: bad", "count": 2}]
    assert summary["request_throughput"] == 1.5
    assert summary["output_throughput"] == 17 / 2
    assert summary["total_token_throughput"] == (30 + 17) / 2
    assert summary["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx(300.0)  # requests with one token have no TPOT
    assert summary["itl_ms"]["median"] == pytest.approx(100.0)
    assert summary["e2el_ms"]["p99"] == pytest.approx(1000 * (1.1 + 0.98 * 1.1))  # 2 · 0.99 = 1.98 of the way up
    assert summary["goodput"] == 0.5  # only the first meets ttft <= 250 ms and tpot <= 200 ms
    assert "goodput" not in summarize(records, 2.0, {})


def test_peak_overlap_counts_half_open_intervals_held_at_once():
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # each ends as the next starts
    assert peak_overlap([(0, 10), (1, 2), (1.5, 3), (2.5, 4), (5, 6)]) == 3  # (0,10), (1.5,3), (2.5,4) at t=2.7
    assert peak_overlap([(0, 1)] * 4) == 4


def test_peak_concurrency_in_flight_and_decoding_of_completed_requests():
    # sent at 0, 0.5, 1: in flight all at once near t=1.2; decoding (first token to end) at most two at once
    records = [RequestRecord("m", sent_at=0.0, ttft=1.0, e2el=1.5), RequestRecord("m", sent_at=0.5, ttft=1.0, e2el=2.0),
               RequestRecord("m", sent_at=1.0, ttft=0.6, e2el=0.7), RequestRecord("m", sent_at=0.0, error="HTTP 400")]
    assert peak_concurrency(records) == {"peak_in_flight": 3, "peak_decoding": 2}
    assert summarize(records, 2.0, {})["peak_decoding"] == 2


def test_goodput_specs_are_checked():
    assert parse_goodput(["ttft:500", "e2el:2000"]) == {"ttft": 0.5, "e2el": 2.0}
    for bad in ("ttft", "itl:5", "tpot:x", "e2el:0"):
        with pytest.raises(ValueError, match=f"--goodput '{bad}'"):
            parse_goodput([bad])


# ------------------------------------------------------------------------------------------ the stream


def sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def send_to(status: int, content: bytes, ignore_eos: bool = True) -> tuple[RequestRecord, list[dict]]:
    """send_request against a fake server answering every POST with status and content; (record, bodies sent)."""
    sent = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(status, content=content)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await send_request(client, "http://fake/v1/", WorkItem([1, 2, 3], 4), "a", ignore_eos, 5.0)

    return asyncio.run(go()), sent


def test_stream_parsing_counts_tokens_times_chunks_and_reports_errors():
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    record, sent = send_to(200, sse(chunk("a"), chunk(""), chunk("bc"), chunk("d"), usage, "[DONE]"))
    assert sent == [{"model": "a", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0, "stream": True,
                     "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": 4}]
    assert record.success and (record.output_tokens, record.prompt_tokens, len(record.itl)) == (4, 3, 2)
    assert 0 < record.ttft <= record.e2el
    record, sent = send_to(200, sse(chunk("a"), chunk("b"), "[DONE]"), ignore_eos=False)
    assert "ignore_eos" not in sent[0] and "min_tokens" not in sent[0]
    assert record.success and record.output_tokens == 2  # no usage chunk: the chunks carrying text
    failures = {
        "HTTP 400: max_tokens too large": (400, json.dumps({"error": {"message": "max_tokens too large"}}).encode()),
        "HTTP 503: overloaded": (503, b"overloaded"),
        "error event: the adapter failed": (200, sse(chunk("a"), {"error": {"message": "the adapter failed"}})),
        "the stream ended without [DONE]": (200, sse(chunk("a"))),
        "the stream carried no choices": (200, sse("[DONE]")),
    }
    for error, (status, content) in failures.items():
        record, _ = send_to(status, content)
        assert (record.error, record.ttft, record.e2el, record.output_tokens) == (error, None, None, 0)
    record, _ = send_to(200, sse("{not json", "[DONE]"))
    assert record.error.startswith("JSONDecodeError on POST http://fake/v1/completions")


# -------------------------------------------------------------------------------------- against a server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    engine = Engine.from_pretrained("demo", mesh="1x1", strategy="bdlora", max_loras=2, max_lora_rank=8,
                                    max_batch=4, max_seq_len=64)
    for name in ADAPTERS:
        engine.add_adapter(name, demo_adapters()[name])
    with running_scheduler(engine, warm_up=False) as served:  # no warm-up: only the 16-token bucket compiles
        yield served


@pytest.fixture(scope="module")
def base_url(app):
    """The module's app served by uvicorn on a free 127.0.0.1 port, in a thread; its /v1 root."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def load_args(base_url: str, *extra: str):
    return build_parser().parse_args(["load", "--base-url", base_url, "--num-prompts", "8", "--input-len", "8",
                                      "--output-len", "6", "--lora-modules", ",".join(ADAPTERS),
                                      "--max-concurrency", "4", *extra])


def histogram_counts(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    return {f.name: next(s.value for s in f.samples if s.name.endswith("_count"))
            for f in text_string_to_metric_families(text) if f.name in HISTOGRAMS}


def finished_requests(scheduler) -> float:
    return sum(s.value for f in scheduler.metrics.registry.collect() if f.name == "bdlora_requests_finished"
               for s in f.samples if s.name.endswith("_total"))


def test_load_at_once_completes_every_request_with_exact_lengths(base_url, scheduler, tmp_path):
    saved = tmp_path / "load.json"
    report = run_load_command(load_args(base_url, "--request-rate", "inf", "--save-json", str(saved),
                                        "--goodput", "e2el:600000"))
    (result,) = report["runs"]
    assert (result["completed"], result["failed"], result["request_rate"]) == (8, 0, "inf")
    assert result["total_output_tokens"] == 8 * 6 and result["total_input_tokens"] == 8 * 8
    assert result["goodput"] == pytest.approx(result["request_throughput"])
    assert sorted(report["setup"]["models"]) == sorted(ADAPTERS)
    records = json.loads(saved.read_text())["runs"][0]["requests"]
    assert len(records) == 8 and {r["model"] for r in records} <= set(ADAPTERS)
    for r in records:
        assert r["success"] and r["output_tokens"] == 6 and r["prompt_tokens"] == 8
        assert 0 < r["ttft"] <= r["e2el"]
        assert r["tpot"] == pytest.approx((r["e2el"] - r["ttft"]) / 5)
        assert 0 <= r["sent_at"] <= result["duration_s"]
    # --max-concurrency 4 and the server's 4 rows bound both peaks
    assert 1 <= result["peak_decoding"] <= result["peak_in_flight"] <= 4
    # every request the server finished so far was observed once by each latency histogram (the scheduler counts a
    # request a moment after its last token went out)
    deadline = time.monotonic() + 10
    while (counts := histogram_counts(base_url)) != {name: finished_requests(scheduler) for name in HISTOGRAMS}:
        assert time.monotonic() < deadline, (counts, finished_requests(scheduler))
        time.sleep(0.05)
    assert counts[HISTOGRAMS[0]] >= 8


def test_sweep_at_finite_rates_writes_one_row_per_rate_and_a_png(base_url, tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    assert bench_main(["load", "--base-url", base_url, "--num-prompts", "8", "--input-len", "8", "--output-len", "4",
                       "--range-ratio", "0.5", "--lora-modules", ",".join(ADAPTERS), "--lora-assignment", "zipf",
                       "--max-concurrency", "4", "--sweep-rates", "20,inf", "--plot", str(plot), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["request_rate"], r["completed"], r["failed"]) for r in report["runs"]] == [(20.0, 8, 0), ("inf", 8, 0)]
    assert all(r["ttft_ms"]["p99"] <= r["e2el_ms"]["p99"] for r in report["runs"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_server_fails_every_request_quickly_with_the_reason(capsys):
    port = free_port()  # nothing listens there
    start = time.monotonic()
    args = build_parser().parse_args(["load", "--base-url", f"http://127.0.0.1:{port}/v1", "--num-prompts", "3",
                                      "--model", "demo", "--timeout", "5"])
    report = run_load_command(args)
    assert time.monotonic() - start < 10
    (result,) = report["runs"]
    assert (result["completed"], result["failed"]) == (0, 3)
    assert result["errors"][0]["error"].startswith(f"ConnectError on POST http://127.0.0.1:{port}/v1/completions")
    assert result["errors"][0]["count"] == 3
    assert result["ttft_ms"]["mean"] is None
    without_model = build_parser().parse_args(["load", "--base-url", f"http://127.0.0.1:{port}/v1"])
    with pytest.raises(SystemExit, match=f"GET http://127.0.0.1:{port}/v1/models gave no model id"):
        run_load_command(without_model)


def test_a_silent_server_is_bounded_by_timeout_and_max_duration():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        for bound, error in [(["--timeout", "0.5"], "timed out after 0.5 s (--timeout)"),
                             (["--timeout", "60", "--max-duration", "0.5"], "stopped at --max-duration 0.5 s")]:
            start = time.monotonic()
            report = run_load_command(build_parser().parse_args(
                ["load", "--base-url", url, "--num-prompts", "3", "--model", "demo", *bound]))
            assert time.monotonic() - start < 5
            (result,) = report["runs"]
            assert (result["completed"], result["failed"], result["errors"]) == (0, 3, [{"error": error, "count": 3}])
