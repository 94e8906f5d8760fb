"""Strict JSON bodies: numbers that neither a float nor a 64-bit integer can hold, and strings that are not valid
Unicode, are refused with 400 naming the field, before any route parses the body.

Python's json reads 1e999 as infinity, accepts NaN and Infinity, reads integers of any length and keeps lone UTF-16
surrogates ("\\ud800") in strings; each of those would otherwise reach a route (and the tokenizer, the sampler or
the JSON encoder of the answer) as a value it cannot take. A body that is not JSON at all is left to the route,
which answers it as malformed.
"""

import json
import math
from typing import Any

from ..errors import BdloraError, InvalidRequestError
from .error_mapping import error_response

INT_LIMIT = 2**63  # integers must lie in [-INT_LIMIT, INT_LIMIT)
LONGEST_SHOWN = 24  # characters of an offending number shown in the message
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Unrepresentable(str):
    """The literal of a JSON number that no float or 64-bit integer holds, kept in place of its value."""


def parse_int(literal: str) -> int | Unrepresentable:
    """A JSON integer, or its literal when it lies outside [-2**63, 2**63) (never converting a huge one)."""
    if len(literal.lstrip("-")) > 19:
        return Unrepresentable(literal)
    value = int(literal)
    return value if -INT_LIMIT <= value < INT_LIMIT else Unrepresentable(literal)


def parse_float(literal: str) -> float | Unrepresentable:
    """A JSON number with a fraction or exponent, or its literal when it overflows to infinity."""
    value = float(literal)
    return value if math.isfinite(value) else Unrepresentable(literal)


def shown(literal: str) -> str:
    """A number's literal, shortened to its first digits and its length when long."""
    return literal if len(literal) <= LONGEST_SHOWN else f"{literal[:LONGEST_SHOWN]}... ({len(literal)} characters)"


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in `text` (not valid Unicode, cannot be encoded as UTF-8), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def first_invalid(document: Any) -> InvalidRequestError | None:
    """The error for the first value of a decoded body that no route can take, naming its field path, else None."""
    pending: list[tuple[str, Any]] = [("body", document)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, Unrepresentable):
            return InvalidRequestError(path, f"{path} must be a finite number within the float and 64-bit integer "
                                             f"range, got {shown(value)}")
        if isinstance(value, str):
            at = lone_surrogate(value)
            if at is not None:
                return InvalidRequestError(path, f"{path} is not valid Unicode: lone surrogate "
                                                 f"{value[at].encode('unicode_escape').decode()} at character {at}")
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                key_path = key if path == "body" else f"{path}.{key}"
                if lone_surrogate(key) is not None:
                    return InvalidRequestError(path, f"a key of {path} is not valid Unicode (lone surrogate)")
                pending.append((key_path, item))
        elif isinstance(value, list):
            pending.extend((f"{path}.{i}" if path != "body" else str(i), item)
                           for i, item in reversed(list(enumerate(value))))
    return None


def strict_decode_error(body: bytes) -> InvalidRequestError | None:
    """The error for a JSON body holding a value no route can take; None for a good body or one that is not JSON."""
    try:
        document = json.loads(body, parse_int=parse_int, parse_float=parse_float, parse_constant=Unrepresentable)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8): the route answers it as malformed
        return None
    return first_invalid(document)


class StrictJsonBody:
    """ASGI middleware reading a request body in full, refusing it by first_invalid, then replaying it to the app.

    It sits inside BodyLimit, so a body over the limit stops being read there. A client that leaves mid-body is
    answered with a 400 that nobody reads (the middleware around expects an answer), and the app is not run.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        """Run the app on the same messages, unless the body holds a value no route can take."""
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        messages, chunks = [], []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = InvalidRequestError("body", "the client disconnected before sending the whole body")
                    return await error_response(gone)(scope, receive, send)
                messages.append(message)
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except BdloraError as e:
            return await error_response(e)(scope, receive, send)
        invalid = strict_decode_error(b"".join(chunks))
        if invalid is not None:
            return await error_response(invalid)(scope, receive, send)

        async def replay():
            """The messages already read, in order, then whatever the client sends next (its disconnect)."""
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
