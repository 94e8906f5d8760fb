"""Serving metrics in Prometheus text, and a process-wide count of XLA compilations (to prove steady state compiles nothing)."""

from __future__ import annotations

import threading
import time

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Histogram buckets (seconds) of the request latencies, as vLLM's /metrics has them.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class CompileCounter:
    """Counts backend compilations through jax.monitoring; one listener per process."""

    _lock = threading.Lock()
    _count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._on_event)
                cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with cls._lock:
                cls._count += 1

    @classmethod
    def count(cls) -> int:
        return cls._count


class ServingMetrics:
    """The counters and gauges /metrics exposes, in their own registry."""

    def __init__(self):
        CompileCounter.install()
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("bdlora_requests_running", "Requests in decode rows", registry=r)
        self.waiting = Gauge("bdlora_requests_waiting", "Requests waiting for a row or an adapter slot", registry=r)
        self.finished = Counter("bdlora_requests_finished", "Requests finished", ["reason"], registry=r)
        self.generated = Counter("bdlora_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge("bdlora_tokens_per_second", "Generated tokens per second over the last steps",
                                       registry=r)
        self.adapter_loads = Gauge("bdlora_adapter_loads", "Adapters written into device slots", registry=r)
        self.adapter_evictions = Gauge("bdlora_adapter_evictions", "Adapters evicted from device slots", registry=r)
        self.adapters_registered = Gauge("bdlora_adapters_registered", "Adapters registered on the host", registry=r)
        self.kv_pages_used = Gauge("bdlora_kv_pages_used", "KV cache pages held by requests (paged cache)",
                                   registry=r)
        self.kv_pages_total = Gauge("bdlora_kv_pages_total", "KV cache pages in the pool (paged cache)", registry=r)
        self.preemptions = Gauge("bdlora_preemptions", "Requests preempted for KV pages, to be recomputed",
                                 registry=r)
        self.prefix_cache_queries = Gauge("bdlora_prefix_cache_queries",
                                          "Prompt tokens in full pages looked up in the prefix cache", registry=r)
        self.prefix_cache_hits = Gauge("bdlora_prefix_cache_hits",
                                       "Prompt tokens found in the prefix cache (not computed again)", registry=r)
        self.compilations = Gauge("bdlora_compilations", "XLA compilations in this process", registry=r)
        self.compilations_after_warmup = Gauge("bdlora_compilations_after_warmup",
                                               "XLA compilations since warm-up finished", registry=r)
        self.time_to_first_token = Histogram("bdlora_time_to_first_token_seconds",
                                             "From a request's arrival at the scheduler to its first token",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("bdlora_time_per_output_token_seconds",
                                               "A finished request's mean time per output token after its first",
                                               buckets=TPOT_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("bdlora_e2e_request_latency_seconds",
                                             "From a request's arrival at the scheduler to its finish",
                                             buckets=E2E_BUCKETS, registry=r)
        self._warm_count: int | None = None
        self._window: list[tuple[float, int]] = []

    def warmed_up(self) -> None:
        self._warm_count = CompileCounter.count()

    def compilations_since_warm_up(self) -> int:
        """XLA compilations in this process since warmed_up (all of them before it)."""
        total = CompileCounter.count()
        return total - self._warm_count if self._warm_count is not None else total

    def record_tokens(self, n: int) -> None:
        """Count generated tokens and keep a 10-second window for tokens/s."""
        self.generated.inc(n)
        now = time.monotonic()
        self._window = [(t, k) for t, k in self._window if now - t < 10.0] + [(now, n)]
        span = now - self._window[0][0]
        self.tokens_per_second.set(sum(k for _, k in self._window) / span if span > 0 else 0.0)

    def first_token(self, request, now: float) -> None:
        """Note the time of a request's first token and observe its time to first token."""
        request.first_token_time = now
        if request.arrival_time is not None:
            self.time_to_first_token.observe(now - request.arrival_time)

    def request_finished(self, request, now: float) -> None:
        """Count a finished request by its reason and observe its end-to-end latency and, when it generated more
        than one token, its time per output token."""
        self.finished.labels(request.finish_reason).inc()
        if request.arrival_time is None:
            return
        self.e2e_request_latency.observe(now - request.arrival_time)
        if request.first_token_time is not None and len(request.output) > 1:
            self.time_per_output_token.observe((now - request.first_token_time) / (len(request.output) - 1))

    def render(self, pool, generator, running: int, waiting: int) -> bytes:
        """The metrics as Prometheus text, gauges read from the adapter pool and the generator now."""
        self.running.set(running)
        self.waiting.set(waiting)
        used, total = generator.kv_pages()
        self.kv_pages_used.set(used)
        self.kv_pages_total.set(total)
        self.preemptions.set(generator.preemptions)
        queried, hit = generator.prefix_cache_tokens()
        self.prefix_cache_queries.set(queried)
        self.prefix_cache_hits.set(hit)
        self.adapter_loads.set(pool.loads)
        self.adapter_evictions.set(pool.evictions)
        self.adapters_registered.set(len(pool.adapters))
        self.compilations.set(CompileCounter.count())
        self.compilations_after_warmup.set(self.compilations_since_warm_up())
        return generate_latest(self.registry)
