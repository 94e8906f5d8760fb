"""uvicorn's server with a graceful shutdown: on SIGTERM or SIGINT it drains before it stops, then returns normally.

uvicorn alone stops accepting connections at once and re-raises the signal after shutting down (so the process
dies by it). Here the first signal starts the drain (new requests get 503), the server stops once no request is in
flight or shutdown_timeout seconds have passed, and `serve` returns, so the caller exits 0. A second signal stops it
at once.
"""

import logging
import time

import uvicorn

from .draining import Drain

log = logging.getLogger(__name__)

FORCED_CLOSE_SECONDS = 1  # what uvicorn waits, after the drain, for connections still open before cancelling them


class GracefulServer(uvicorn.Server):
    """A uvicorn Server whose exit signals drain `drain` for up to shutdown_timeout seconds before it stops."""

    def __init__(self, config: uvicorn.Config, drain: Drain, shutdown_timeout: float):
        if not shutdown_timeout >= 0:
            raise ValueError(f"shutdown timeout must be >= 0 seconds, got {shutdown_timeout}")
        config.timeout_graceful_shutdown = FORCED_CLOSE_SECONDS
        super().__init__(config)
        self.drain, self.shutdown_timeout = drain, shutdown_timeout
        self.deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        """First signal: start draining. Second: stop now. The signal is not re-raised after serving."""
        if self.deadline is None:
            log.warning("signal %s: draining (%d requests in flight, up to %ss)", sig, self.drain.in_flight,
                        self.shutdown_timeout)
            self.drain.start()
            self.deadline = time.monotonic() + self.shutdown_timeout
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        """Stop once draining and no request is in flight, or the shutdown timeout has passed."""
        if self.deadline is not None and (self.drain.idle or time.monotonic() >= self.deadline):
            self.should_exit = True
        return await super().on_tick(counter)
