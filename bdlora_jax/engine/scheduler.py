"""The scheduler thread: the only code that touches the device while serving; HTTP handlers only enqueue.

Each loop turn runs queued commands (adapter load/unload) and cancellations, then one generation step. Listeners
of a request are called from this thread with every new token, and once with token None when a request ends
without one (cancelled, or failed by an internal error, which fails only the requests of that step).

In a multi-process server the scheduler of process 0 sends each operation to the followers (replica_channel)
just before it runs it, so every process enters the same computations, and relays each step's sampled tokens. A
follower lost (its connection closed, or silent past the channel's timeout, or a step stuck that long in a
collective it never joins) fails every request with PeerLostError and stops the loop, and `on_peer_lost` tells
the server to exit.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..adapters.adapter import LoraAdapter
from ..errors import AdapterInUseError, PeerLostError
from .generator import Generator, Request
from .metrics import ServingMetrics
from .replica_channel import LeaderChannel
from .replica_ops import StepWatchdog, adapter_op, leader_fetch, submit_op

log = logging.getLogger(__name__)


class Scheduler:
    """Runs the engine's Generator in a background thread, with commands executed between steps."""

    def __init__(self, engine, metrics: ServingMetrics | None = None, replicas: LeaderChannel | None = None,
                 on_peer_lost: Callable[[PeerLostError], None] | None = None):
        self.engine = engine
        self.generator: Generator = engine.generator
        self.metrics = metrics or ServingMetrics()
        self.replicas = replicas
        self.on_peer_lost = on_peer_lost
        self.peer_lost: PeerLostError | None = None
        self._losing = threading.Lock()
        self._watching: contextlib.AbstractContextManager = contextlib.nullcontext()  # a StepWatchdog with followers
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._cancels: queue.Queue[Request] = queue.Queue()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future, dict | None]] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bdlora-scheduler", daemon=True)

    def start(self) -> None:
        """Serve from the scheduler thread (after warm-up, which every process runs on its own)."""
        if self.replicas is not None:
            self.generator.fetch_sampled = leader_fetch(self.replicas)
            self._watching = StepWatchdog(self.replicas.timeout, self._lose_peer)
        self._thread.start()

    def stop(self) -> None:
        """End the loop after its current turn; not waiting for one stuck in a step with a lost peer."""
        self._stopping.set()
        self._wake.set()
        if self.peer_lost is None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue a request (its arrival time noted for the latency metrics); its on_token listener will be called
        from the scheduler thread."""
        request.arrival_time = time.monotonic()
        if self.peer_lost is not None:
            request.finish_reason, request.error = "error", self.peer_lost
            if request.on_token is not None:
                request.on_token(request, None)
            return
        self._inbox.put(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        """Cancel a request (its client has gone) at the start of the next loop turn, where every process of a
        multi-process server cancels it at the same point."""
        self._cancels.put(request)
        self._wake.set()

    def call(self, fn: Callable[[], Any], op: dict | None = None) -> Future:
        """Run fn in the scheduler thread between steps (e.g. an adapter load) and return its future; op describes
        it to the followers of a multi-process server, which refuses a command without one."""
        future: Future = Future()
        if self.peer_lost is not None:
            future.set_exception(self.peer_lost)
            return future
        if self.replicas is not None and op is None:
            future.set_exception(ValueError("this command cannot run on every process of a multi-process server"))
            return future
        self._commands.put((fn, future, op))
        self._wake.set()
        return future

    def add_adapter(self, name: str, adapter: str | Path | LoraAdapter, source: str | Path | None = None) -> Future:
        """Register an adapter (a directory, or one read from the directory `source`) between steps; its future
        raises as Engine.add_adapter does. Across processes each follower reads the directory itself."""
        op = adapter_op("add_adapter", name, adapter if source is None else source)
        return self.call(lambda: self.engine.add_adapter(name, adapter), op)

    def remove_adapter(self, name: str) -> Future:
        """Unregister an adapter between steps; the future raises AdapterInUseError while running or waiting
        requests use it, and what Engine.remove_adapter raises otherwise (AdapterNotFoundError, ...)."""

        def remove():
            if name in self.engine.pool.adapters and self._in_use(name):
                raise AdapterInUseError(name)
            self.engine.remove_adapter(name)

        return self.call(remove, adapter_op("remove_adapter", name))

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
        try:
            self._turns()
        except PeerLostError as e:
            self._lose_peer(e)

    def _lose_peer(self, error: PeerLostError) -> None:
        """Nothing can run without the lost process: fail everything, then exit (once, from the scheduler thread or
        from the watchdog while that thread is stuck in a step)."""
        with self._losing:
            if self.peer_lost is not None:
                return
            log.error("%s; failing every request and stopping", error)
            self.peer_lost = error
        self._finish(self._fail_in_flight(error) + self._take_inbox(replicate=False))
        if self.on_peer_lost is not None:
            self.on_peer_lost(error)

    def _turns(self) -> None:
        while not self._stopping.is_set() and self.peer_lost is None:
            self._run_commands()
            self._finish(self._take_inbox())
            self._apply_cancels()
            if not self.generator.has_work():
                self._replicate({"op": "ping"})
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            before = self.generator.generated_tokens
            self._replicate({"op": "step"})
            try:
                with self._watching:
                    finished = self.generator.step()
            except Exception:  # an internal error fails the requests in flight, never the server
                self._replicate({"op": "ping"})  # unless a lost process broke the step: PeerLostError ends serving
                log.exception("generation step failed; failing the requests in flight")
                finished = self._fail_in_flight()
            if self.peer_lost is not None:  # the watchdog has failed every request while this step was stuck
                return
            self.metrics.record_tokens(self.generator.generated_tokens - before)
            self._note_first_tokens(finished)
            self._finish(finished)
        if self.replicas is not None:
            self.replicas.close()

    def _replicate(self, op: dict) -> None:
        """Send op to the followers of a multi-process server before running it here."""
        if self.replicas is not None:
            self.replicas.broadcast(op)

    def _apply_cancels(self) -> None:
        """End the requests cancelled since the last turn now, before the step: /metrics then never shows one as
        neither running nor finished while a step runs."""
        cancelled = False
        while not self._cancels.empty():
            request = self._cancels.get_nowait()
            if request.finish_reason is None and not request.cancelled:
                self._replicate({"op": "cancel", "id": request.id})
                request.cancelled = cancelled = True
        if cancelled:
            self._finish(self.generator.drop_cancelled())

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

    def _take_inbox(self, replicate: bool = True) -> list[Request]:
        """Hand submitted requests to the generator, so commands (an unload) see them as waiting.

        A request whose adapter was unregistered between its validation and now fails alone (finish_reason
        "error"); handing it on would fail the next step and with it every request in flight. After a peer is lost
        (replicate False) every submitted request fails.
        """
        rejected = []
        while not self._inbox.empty():
            request = self._inbox.get_nowait()
            if not replicate:
                request.finish_reason, request.error = "error", self.peer_lost
                rejected.append(request)
            elif request.adapter is not None and not self.engine.has_adapter(request.adapter):
                request.finish_reason = "error"
                rejected.append(request)
            else:  # handed on first, so that a lost peer fails it with the requests in flight
                self.generator.submit(request)
                self._replicate(submit_op(request))
        return rejected

    def _run_commands(self) -> None:
        while not self._commands.empty():
            fn, future, op = self._commands.get_nowait()
            self._finish(self._take_inbox())
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - any failure goes to the caller waiting on the future
                future.set_exception(e)
                continue
            future.set_result(result)
            if op is not None:  # host-only commands (adapter registration): followers repeat what succeeded
                self._replicate(op)

    def _fail_in_flight(self, error: PeerLostError | None = None) -> list[Request]:
        failed = [*self.generator.running.values(), *self.generator.waiting]
        for request in failed:
            request.finish_reason, request.error = "error", error
        self.generator.running.clear()
        self.generator.waiting.clear()
        return failed
