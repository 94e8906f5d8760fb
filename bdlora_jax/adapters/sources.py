"""Where adapters come from: the rules for an adapter's name and for the path it is read from.

Names are what requests put in "model" and what /v1/models lists, so they must be printable UTF-8 text.
Path text is checked before the filesystem is touched; files are then confined, symlinks resolved, to a root.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from ..errors import AdapterError, ForbiddenPathError, InvalidRequestError

MAX_NAME_CHARS = 256
MAX_PATH_BYTES = 4096  # Linux PATH_MAX
MAX_COMPONENT_BYTES = 255  # Linux NAME_MAX


def _utf8(text: str, field: str) -> bytes:
    """The UTF-8 bytes of text; InvalidRequestError naming the field when it holds a lone UTF-16 surrogate."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(field, f"{field} is not valid UTF-8: it holds a lone UTF-16 surrogate "
                                         f"{text[e.start]!r} at position {e.start}") from None


def check_adapter_name(name: str, field: str = "lora_name") -> str:
    """The name, if it may name an adapter: 1..256 characters of valid UTF-8 without control characters."""
    if not isinstance(name, str):
        raise InvalidRequestError(field, f"{field} must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidRequestError(field, f"{field} must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRequestError(field, f"{field} has {len(name)} characters; expected at most {MAX_NAME_CHARS}")
    _utf8(name, field)
    control = next((i for i, c in enumerate(name) if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise InvalidRequestError(field, f"{field} holds the control character {name[control]!r} at position "
                                         f"{control}; expected printable text")
    return name


def check_path_text(text: str, field: str = "lora_path") -> str:
    """The path text, if a filesystem could take it: non-empty UTF-8 without NUL, at most 4096 bytes and
    255 bytes a component; checked before the filesystem is touched."""
    if not text:
        raise InvalidRequestError(field, f"{field} must not be empty")
    if "\x00" in text:
        raise InvalidRequestError(field, f"{field} holds a NUL byte at position {text.index(chr(0))}")
    encoded = _utf8(text, field)
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidRequestError(field, f"{field} is {len(encoded)} bytes long; expected at most {MAX_PATH_BYTES}")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > MAX_COMPONENT_BYTES:
        raise InvalidRequestError(field, f"{field} has a component of {len(longest)} bytes "
                                         f"({longest[:24].decode(errors='replace')!r}...); "
                                         f"expected at most {MAX_COMPONENT_BYTES}")
    return text


def confine(path: Path, root: Path | None) -> Path:
    """path with every symlink resolved; ForbiddenPathError when root is given and it lies outside root."""
    try:
        target = path.resolve()
        allowed = root.resolve() if root is not None else None
    except (OSError, RuntimeError) as e:  # a symlink loop, or a component that cannot be read
        raise AdapterError(f"{path}: cannot resolve the path ({e})", path=path) from None
    if allowed is not None and not target.is_relative_to(allowed):
        raise ForbiddenPathError(str(path), root, target)
    return target
