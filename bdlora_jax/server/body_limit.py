"""The request-body size limit: refused with 413 whether the body declares its length or streams in chunked."""

from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..errors import RequestTooLargeError

MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyTooLarge(RequestTooLargeError, HTTPException):
    """A body that grew past MAX_BODY_BYTES while it streamed in.

    Also an HTTPException, because FastAPI's body parsing re-raises only those (any other error it turns into a
    400 of its own); the error table still answers it, as a RequestTooLargeError.
    """

    def __init__(self):
        RequestTooLargeError.__init__(self, MAX_BODY_BYTES)
        HTTPException.__init__(self, 413, self.message)


def declared_too_large(request: Request) -> RequestTooLargeError | None:
    """The error for a request whose Content-Length exceeds MAX_BODY_BYTES, else None.

    A Content-Length that is not a number is left to the HTTP server (and BodyLimit counts what arrives); one of
    more digits than any size converts to is too large without converting it.
    """
    length = (request.headers.get("content-length") or "").strip()
    if not length.isascii() or not length.isdigit():
        return None
    size = int(length) if len(length) <= 20 else None
    if size is None or size > MAX_BODY_BYTES:
        return RequestTooLargeError(MAX_BODY_BYTES, size)
    return None


class BodyLimit:
    """ASGI middleware counting the bytes of a request body as they arrive, so a body sent without Content-Length
    (chunked) is refused with 413 too, before it is all in memory."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        """Run the app on an HTTP request whose receive raises BodyTooLarge once the body passes the limit."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def limited():
            """The next message of the request, counting its body bytes."""
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)
