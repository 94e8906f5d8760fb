"""Draining for shutdown: once it starts, new requests get 503 while those in flight run to their end."""

from ..errors import ServerShuttingDownError
from .error_mapping import error_response


class Drain:
    """Whether the server still admits requests, and how many HTTP requests are in flight."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0

    def start(self) -> None:
        """Stop admitting requests (those in flight go on)."""
        self.draining = True

    @property
    def idle(self) -> bool:
        """Whether no request is in flight."""
        return self.in_flight == 0


class DrainGate:
    """ASGI middleware counting HTTP requests in flight, and answering every new one with 503 while draining.

    The 503 closes its connection, so keep-alive clients reconnect elsewhere.
    """

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        """Refuse an HTTP request while draining; run any other, counted while it is in flight."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining:
            response = error_response(ServerShuttingDownError())
            response.headers["connection"] = "close"
            return await response(scope, receive, send)
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
