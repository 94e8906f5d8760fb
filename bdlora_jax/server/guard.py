"""The checks every request passes before routing: a declared body size within the limit, and the API key."""

from fastapi import FastAPI, Request

from ..errors import AuthenticationError, BdloraError
from .body_limit import declared_too_large
from .error_mapping import error_response


def missing_api_key(request: Request, api_key: str | None) -> AuthenticationError | None:
    """The error for a /v1/* request without 'Authorization: Bearer <api_key>' (None when no key is set)."""
    if api_key and request.url.path.startswith("/v1/") and \
            request.headers.get("authorization") != f"Bearer {api_key}":
        return AuthenticationError()
    return None


def refusal(request: Request, api_key: str | None) -> BdloraError | None:
    """Why this request is refused before routing (body size first, then the API key), or None."""
    return declared_too_large(request) or missing_api_key(request, api_key)


def add_guard(app: FastAPI, api_key: str | None) -> None:
    """Install the HTTP middleware answering a refused request by the error table, before it reaches a route."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Answer a refused request at once; pass any other on."""
        refused = refusal(request, api_key)
        return error_response(refused) if refused is not None else await call_next(request)
