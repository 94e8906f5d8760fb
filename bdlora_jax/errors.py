"""Typed errors: what bdlora_jax raises on input a caller can fix, each carrying its field, value or adapter name.

Each class also derives from the built-in error that callers caught before (ValueError, KeyError, ...), so
`except ValueError` still works; `message` is the text shown to the user. The HTTP server answers each type
with the status of its row in one table (bdlora_jax.server.error_mapping) and never reads a message.
"""

from __future__ import annotations

from pathlib import Path


class BdloraError(Exception):
    """Base of every typed bdlora_jax error; `message` is the human-readable text."""

    def __init__(self, message: str):
        # Exception.__init__ rather than super(): the built-in bases all take the message alike, and a class that
        # also derives from a framework exception (whose __init__ takes other arguments) initialises that part itself
        Exception.__init__(self, message)
        self.message = message


class InvalidRequestError(BdloraError, ValueError):
    """A request or call argument outside what the engine accepts; `field` names it (e.g. 'top_p', 'prompt')."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ContextLengthError(InvalidRequestError):
    """A prompt plus max_tokens that do not fit the engine's max_seq_len."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_seq_len: int, message: str):
        super().__init__("max_tokens", message)
        self.prompt_tokens, self.max_tokens, self.max_seq_len = prompt_tokens, max_tokens, max_seq_len


class MultiplePromptsError(InvalidRequestError):
    """A request with several prompts; the server completes one prompt per request."""

    def __init__(self):
        super().__init__("prompt", "only one prompt per request is supported")


class MalformedBodyError(InvalidRequestError):
    """A request body that is not valid JSON; `detail` says where the parser stopped."""

    def __init__(self, detail: str):
        super().__init__("body", f"malformed JSON body: {detail}")
        self.detail = detail


class ModelNotFoundError(BdloraError, LookupError):
    """A request naming neither the served base model nor an adapter; `model` is the name it gave."""

    def __init__(self, model: str):
        super().__init__(f"model {model!r} does not exist; see /v1/models")
        self.model = model


class AdapterNotFoundError(BdloraError, KeyError):
    """An adapter name that is not registered; `name` is that name."""

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} is not registered")
        self.name = name


class AdapterConflictError(BdloraError, ValueError):
    """An adapter name that is already taken (by an adapter, the compressed bank or the served model)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class AdapterNotRemovableError(BdloraError, ValueError):
    """An adapter of the compressed bank, which is placed once at start-up and served for the engine's lifetime."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class AdapterInUseError(BdloraError, RuntimeError):
    """An unload of an adapter that running or waiting requests still use."""

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} is used by running or waiting requests; unload it when they have finished")
        self.name = name


class AdapterError(BdloraError, ValueError):
    """A PEFT adapter that cannot be served on this base model; the message names the file and field.

    `path` is the file or directory at fault where the adapter was read from disk (None for an in-memory one).
    """

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class PoolFullError(BdloraError, RuntimeError):
    """Every device slot holds an adapter that the current batch needs; `capacity` is max_loras."""

    def __init__(self, capacity: int, message: str):
        super().__init__(message)
        self.capacity = capacity


class ForbiddenPathError(BdloraError):
    """An adapter path outside the directory the server may load adapters from (--lora-root).

    `target` is where a path inside the root leads once its symlinks are resolved (None: the path itself is outside).
    """

    def __init__(self, path: str, root: Path, target: Path | None = None):
        where = f"lora_path {path!r}" if target is None else f"{path!r} resolves to {str(target)!r}, which"
        super().__init__(f"{where} is outside the allowed --lora-root {str(root)!r}")
        self.path, self.root, self.target = path, root, target


class AuthenticationError(BdloraError):
    """A request to /v1/* without the server's API key."""

    def __init__(self):
        super().__init__("missing or invalid API key (Authorization: Bearer ...)")


class RequestTooLargeError(BdloraError, ValueError):
    """A request body over `limit` bytes; `size` is its declared length (None while it streams in)."""

    def __init__(self, limit: int, size: int | None = None):
        super().__init__(f"request body exceeds {limit} bytes" if size is None
                         else f"request body of {size} bytes exceeds {limit}")
        self.limit, self.size = limit, size


class RequestFailedError(BdloraError, RuntimeError):
    """An accepted request that ended without completing; `reason` is its finish reason ('error' or 'abort')."""

    def __init__(self, reason: str | None):
        super().__init__(f"request ended: {reason}")
        self.reason = reason


class ServerShuttingDownError(BdloraError, RuntimeError):
    """A request that arrived after the server began shutting down; requests already in flight still finish."""

    def __init__(self):
        super().__init__("the server is shutting down and admits no new requests")


class PeerLostError(BdloraError, RuntimeError):
    """A process of a multi-process server stopped answering or closed its connection; the server fails what is in
    flight and exits, since the others cannot compute without it."""
