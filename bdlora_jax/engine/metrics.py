"""Serving metrics in Prometheus text, and a process-wide count of XLA compilations (to prove steady state compiles nothing)."""

from __future__ import annotations

import threading
import time

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


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
        self.compilations = Gauge("bdlora_compilations", "XLA compilations in this process", registry=r)
        self.compilations_after_warmup = Gauge("bdlora_compilations_after_warmup",
                                               "XLA compilations since warm-up finished", registry=r)
        self._warm_count: int | None = None
        self._window: list[tuple[float, int]] = []

    def warmed_up(self) -> None:
        self._warm_count = CompileCounter.count()

    def record_tokens(self, n: int) -> None:
        """Count generated tokens and keep a 10-second window for tokens/s."""
        self.generated.inc(n)
        now = time.monotonic()
        self._window = [(t, k) for t, k in self._window if now - t < 10.0] + [(now, n)]
        span = now - self._window[0][0]
        self.tokens_per_second.set(sum(k for _, k in self._window) / span if span > 0 else 0.0)

    def render(self, pool, running: int, waiting: int) -> bytes:
        self.running.set(running)
        self.waiting.set(waiting)
        self.adapter_loads.set(pool.loads)
        self.adapter_evictions.set(pool.evictions)
        self.adapters_registered.set(len(pool.adapters))
        total = CompileCounter.count()
        self.compilations.set(total)
        self.compilations_after_warmup.set(total - self._warm_count if self._warm_count is not None else total)
        return generate_latest(self.registry)
