"""HTTP answers to errors: one table from error type to status and OpenAI error type and code.

A route raises a typed error (bdlora_jax.errors) or lets the engine's propagate; the handler answers it with
the row of its nearest class in ERROR_KINDS as {"error": {"message", "type", "code"}}. No message is parsed:
what a row shows beyond the message comes from the error's attributes.
"""

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AdapterConflictError,
    AdapterError,
    AdapterInUseError,
    AdapterNotFoundError,
    AdapterNotRemovableError,
    AuthenticationError,
    BdloraError,
    ContextLengthError,
    ForbiddenPathError,
    InvalidRequestError,
    MalformedBodyError,
    ModelNotFoundError,
    MultiplePromptsError,
    PeerLostError,
    RequestFailedError,
    RequestTooLargeError,
    ServerShuttingDownError,
)

INVALID_REQUEST = "invalid_request_error"


def _naming_the_field(error: InvalidRequestError) -> str:
    """The message led by the field it is about: "invalid field 'top_p': top_p must be in (0, 1], got 1.5"."""
    return f"invalid field {error.field!r}: {error.message}"


@dataclass(frozen=True)
class ErrorKind:
    """How errors of one type are answered: HTTP status, OpenAI error `type` and `code`, and the message shown.

    code and message may be functions of the error, for what only the error knows (a finish reason, a field).
    """

    status: int
    type: str
    code: str | Callable[[Any], str | None] | None = None
    message: Callable[[Any], str] = attrgetter("message")


ERROR_KINDS: dict[type[BdloraError], ErrorKind] = {
    BdloraError: ErrorKind(500, "server_error"),
    InvalidRequestError: ErrorKind(400, INVALID_REQUEST, message=_naming_the_field),
    ContextLengthError: ErrorKind(400, INVALID_REQUEST, "context_length_exceeded"),
    MultiplePromptsError: ErrorKind(400, INVALID_REQUEST, "multiple_prompts"),
    MalformedBodyError: ErrorKind(400, INVALID_REQUEST),
    RequestTooLargeError: ErrorKind(413, INVALID_REQUEST, "body_too_large"),
    AuthenticationError: ErrorKind(401, "authentication_error", "invalid_api_key"),
    ModelNotFoundError: ErrorKind(404, "not_found_error", "model_not_found"),
    AdapterError: ErrorKind(400, INVALID_REQUEST, "invalid_adapter"),
    AdapterConflictError: ErrorKind(400, INVALID_REQUEST, "name_taken"),
    AdapterNotFoundError: ErrorKind(404, "not_found_error", "adapter_not_found"),
    AdapterNotRemovableError: ErrorKind(400, INVALID_REQUEST, "compressed_adapter"),
    AdapterInUseError: ErrorKind(409, "conflict_error", "adapter_in_use"),
    ForbiddenPathError: ErrorKind(403, "permission_error", "forbidden_path"),
    RequestFailedError: ErrorKind(500, "server_error", attrgetter("reason")),
    ServerShuttingDownError: ErrorKind(503, "service_unavailable_error", "shutting_down"),
    PeerLostError: ErrorKind(503, "service_unavailable_error", "peer_lost"),
}

# codes of the errors that Starlette itself raises (no route, wrong method), which carry their own status
FRAMEWORK_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_kind(error: BdloraError) -> ErrorKind:
    """The row of the nearest class of `error` in ERROR_KINDS (BdloraError's row at worst)."""
    return next(ERROR_KINDS[cls] for cls in type(error).__mro__ if cls in ERROR_KINDS)


def error_body(error: BdloraError) -> dict:
    """The OpenAI error body of a typed error: {"error": {"message", "type", "code"}}."""
    kind = error_kind(error)
    code = kind.code(error) if callable(kind.code) else kind.code
    return {"error": {"message": kind.message(error), "type": kind.type, "code": code}}


def error_response(error: BdloraError) -> JSONResponse:
    """The JSON response answering a typed error, with its row's status."""
    return JSONResponse(error_body(error), status_code=error_kind(error).status)


def install_error_handlers(app: FastAPI) -> None:
    """Answer typed errors by the table, and Starlette's and pydantic's own errors in the same body shape."""

    @app.exception_handler(BdloraError)
    async def typed_error(_, error: BdloraError):
        """A typed error, by its row of the table."""
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, exc: RequestValidationError):
        """A body that is not JSON, or a field pydantic refuses (missing, wrongly typed, unsupported), naming it."""
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(MalformedBodyError(first.get("msg")))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if first.get("type") == "extra_forbidden":
            return error_response(InvalidRequestError(where, "this server does not support this field"))
        return error_response(InvalidRequestError(where, first.get("msg")))

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(_, exc: StarletteHTTPException):
        """An error Starlette raises itself, with its own status."""
        body = {"error": {"message": str(exc.detail), "type": INVALID_REQUEST,
                          "code": FRAMEWORK_CODES.get(exc.status_code)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
