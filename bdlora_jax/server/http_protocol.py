"""uvicorn's h11 protocol, closing a connection that stays idle while its request has not fully arrived.

uvicorn times out idle keep-alive connections between requests, but not one that has sent half a request line,
half its headers or half its body (or nothing since it connected), which would otherwise hold its socket forever.
"""

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class RequestTimeoutProtocol(H11Protocol):
    """H11Protocol closing the connection after `request_timeout` seconds without a byte while a request is due.

    A subclass with request_timeout set is made by with_request_timeout, for uvicorn's `http` setting.
    """

    request_timeout: float = 30.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        """Start the clock for the first request."""
        super().connection_made(transport)
        self._rearm()

    def data_received(self, data: bytes) -> None:
        """Restart the clock on every byte while the request is still incomplete."""
        super().data_received(data)
        self._rearm()

    def connection_lost(self, exc) -> None:
        """Stop the clock."""
        self._disarm()
        super().connection_lost(exc)

    def awaiting_request(self) -> bool:
        """Whether a request is due and has not fully arrived: nothing sent yet since connecting, or part of one.

        Between requests of a keep-alive connection (nothing buffered) uvicorn's own keep-alive timeout applies.
        """
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return True
        return state is h11.IDLE and (self.cycle is None or bool(self.conn.trailing_data[0]))

    def _rearm(self) -> None:
        """Restart the clock when a request is due, stop it otherwise."""
        self._disarm()
        if self.awaiting_request() and not self.transport.is_closing():
            self.request_timer = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        """Stop the clock."""
        if self.request_timer is not None:
            self.request_timer.cancel()
            self.request_timer = None

    def _timed_out(self) -> None:
        """Close a connection whose request is still incomplete after the timeout."""
        self.request_timer = None
        if self.awaiting_request() and not self.transport.is_closing():
            self.transport.close()


def with_request_timeout(seconds: float) -> type[RequestTimeoutProtocol]:
    """The protocol class for uvicorn's `http` setting, closing connections idle mid-request after `seconds`."""
    if not seconds > 0:
        raise ValueError(f"request timeout must be > 0 seconds, got {seconds}")
    return type("RequestTimeoutProtocol", (RequestTimeoutProtocol,), {"request_timeout": float(seconds)})
