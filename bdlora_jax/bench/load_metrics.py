"""The statistics of `bench load`: one record per request (when it was sent, TTFT, inter-token gaps, end-to-end
latency, token counts or its error), the run's summary (throughputs, mean / median / p90 / p99 latencies in ms,
peak concurrency) and goodput."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What one request measured (seconds, from when it was sent; sent_at from the run's start), or why it failed."""

    model: str
    sent_at: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2el: float | None = None
    error: str | None = None

    @property
    def success(self) -> bool:
        """Whether the request completed (no error)."""
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (E2EL - TTFT) / (output tokens - 1); 0 for one token."""
        if self.e2el is None or self.ttft is None:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    def to_json(self) -> dict:
        """The record as saved by --save-json, with its TPOT and success."""
        return {**asdict(self), "tpot": self.tpot, "success": self.success}


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """SLOs from `--goodput ttft:MS tpot:MS e2el:MS` as metric -> seconds; a bad one raises ValueError naming it."""
    slos = {}
    for spec in specs or []:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput {spec!r}: expected METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"--goodput {spec!r}: the SLO must be > 0 ms")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a completed request is within every given SLO (seconds)."""
    return record.success and all(getattr(record, name) <= limit for name, limit in slos.items())


def distribution_ms(seconds: list[float]) -> dict[str, float | None]:
    """Mean, median, p90 and p99 in milliseconds (numpy's linear percentiles); None each without samples."""
    if not seconds:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ms = np.asarray(seconds, dtype=float) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
    return {"mean": float(ms.mean()), "median": p50, "p90": p90, "p99": p99}


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most of the half-open intervals [start, end) that hold at one instant (0 without intervals)."""
    events = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    peak = held = 0
    for _, change in events:  # at equal times an end sorts before a start: [a, b) and [b, c) never overlap
        held += change
        peak = max(peak, held)
    return peak


def peak_concurrency(records: list[RequestRecord]) -> dict[str, int]:
    """Of the completed requests, the most at once in flight (sent, not finished) and decoding (first token
    streamed, not finished): the second is how many requests the server held in its batch at once."""
    timed = [r for r in records if r.success and r.sent_at is not None]
    return {"peak_in_flight": peak_overlap([(r.sent_at, r.sent_at + r.e2el) for r in timed]),
            "peak_decoding": peak_overlap([(r.sent_at + r.ttft, r.sent_at + r.e2el) for r in timed])}


def summarize(records: list[RequestRecord], duration: float, slos: dict[str, float]) -> dict:
    """The run's summary: request counts, the first error texts of the failed, throughputs over `duration`
    seconds, the TTFT / TPOT / ITL / E2EL distributions and peak concurrency of the completed requests; goodput
    with SLOs."""
    done = [r for r in records if r.success]
    errors: dict[str, int] = {}
    for r in records:
        if not r.success:
            errors[r.error] = errors.get(r.error, 0) + 1
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    summary = {
        "completed": len(done), "failed": len(records) - len(done),
        "errors": [{"error": text, "count": count} for text, count in errors.items()][:5],
        "duration_s": duration, "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(done)), "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft_ms": distribution_ms([r.ttft for r in done]),
        "tpot_ms": distribution_ms([r.tpot for r in done if r.output_tokens > 1]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": distribution_ms([r.e2el for r in done]),
        **peak_concurrency(done),
    }
    if slos:
        summary["goodput"] = per_s(sum(meets_slos(r, slos) for r in done))
        summary["slos_ms"] = {name: limit * 1000.0 for name, limit in slos.items()}
    return summary
