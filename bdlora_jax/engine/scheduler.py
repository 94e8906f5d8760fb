"""The scheduler thread: the only code that touches the device while serving; HTTP handlers only enqueue.

Each loop turn runs queued commands (adapter load/unload) and then one generation step. Listeners of a
request are called from this thread with every new token, and once with token None when a request ends
without one (cancelled, or failed by an internal error, which fails only the requests of that step).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..adapters.adapter import LoraAdapter
from ..errors import AdapterInUseError
from .generator import Generator, Request
from .metrics import ServingMetrics

log = logging.getLogger(__name__)


class Scheduler:
    """Runs the engine's Generator in a background thread, with commands executed between steps."""

    def __init__(self, engine, metrics: ServingMetrics | None = None):
        self.engine = engine
        self.generator: Generator = engine.generator
        self.metrics = metrics or ServingMetrics()
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bdlora-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue a request (its arrival time noted for the latency metrics); its on_token listener will be called
        from the scheduler thread."""
        request.arrival_time = time.monotonic()
        self._inbox.put(request)
        self._wake.set()

    def wake(self) -> None:
        """Have the loop look again (e.g. after a request was cancelled)."""
        self._wake.set()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn in the scheduler thread between steps (e.g. an adapter load) and return its future."""
        future: Future = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return future

    def add_adapter(self, name: str, adapter: str | Path | LoraAdapter) -> Future:
        """Register an adapter between steps; its future raises as Engine.add_adapter does."""
        return self.call(lambda: self.engine.add_adapter(name, adapter))

    def remove_adapter(self, name: str) -> Future:
        """Unregister an adapter between steps; the future raises AdapterInUseError while running or waiting
        requests use it, and what Engine.remove_adapter raises otherwise (AdapterNotFoundError, ...)."""

        def remove():
            if name in self.engine.pool.adapters and self._in_use(name):
                raise AdapterInUseError(name)
            self.engine.remove_adapter(name)

        return self.call(remove)

    def _in_use(self, name: str) -> bool:
        """Whether a running or waiting request uses this adapter (in the scheduler thread, which has just handed
        the submitted requests to the generator)."""
        return name in self.generator.adapters_in_use() or any(r.adapter == name for r in self.generator.waiting)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self.generator.running), len(self.generator.waiting) + self._inbox.qsize()

    def warm_up(self) -> None:
        """Compile every prefill bucket, insert, decode and a slot write, so serving compiles nothing new."""
        self.engine.pool.warm_up()
        self.generator.warm_up()
        self.metrics.warmed_up()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._run_commands()
            self._finish(self._take_inbox())
            if not self.generator.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            before = self.generator.generated_tokens
            try:
                finished = self.generator.step()
            except Exception:  # an internal error fails the requests in flight, never the server
                log.exception("generation step failed; failing the requests in flight")
                finished = self._fail_in_flight()
            self.metrics.record_tokens(self.generator.generated_tokens - before)
            self._note_first_tokens(finished)
            self._finish(finished)

    def _note_first_tokens(self, finished: list[Request]) -> None:
        """Time the first token of every request whose first token this step produced."""
        now = time.monotonic()
        for request in [*self.generator.running.values(), *finished]:
            if request.first_token_time is None and request.output:
                self.metrics.first_token(request, now)

    def _finish(self, finished: list[Request]) -> None:
        now = time.monotonic()
        for request in finished:
            self.metrics.request_finished(request, now)
            if request.finish_reason in ("abort", "error") and request.on_token is not None:
                request.on_token(request, None)

    def _take_inbox(self) -> list[Request]:
        """Hand submitted requests to the generator, so commands (an unload) see them as waiting.

        A request whose adapter was unregistered between its validation and now fails alone (finish_reason
        "error"); handing it on would fail the next step and with it every request in flight.
        """
        rejected = []
        while not self._inbox.empty():
            request = self._inbox.get_nowait()
            if request.adapter is not None and not self.engine.has_adapter(request.adapter):
                request.finish_reason = "error"
                rejected.append(request)
            else:
                self.generator.submit(request)
        return rejected

    def _run_commands(self) -> None:
        while not self._commands.empty():
            fn, future = self._commands.get_nowait()
            self._finish(self._take_inbox())
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - any failure goes to the caller waiting on the future
                future.set_exception(e)

    def _fail_in_flight(self) -> list[Request]:
        failed = [*self.generator.running.values(), *self.generator.waiting]
        for request in failed:
            request.finish_reason = "error"
        self.generator.running.clear()
        self.generator.waiting.clear()
        return failed
