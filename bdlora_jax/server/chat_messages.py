"""The messages of a chat request, checked and put in the form a chat template reads: role, content as text, name."""

from typing import Any

from ..errors import InvalidRequestError

ROLES = ("system", "user", "assistant")
MESSAGE_FIELDS = ("role", "content", "name")


def content_text(content: Any, where: str) -> str:
    """A message's content as one string: the string given, or its text parts joined by newlines (as vLLM does)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(where, 'content must be a string or a list of {"type": "text", "text": ...} parts, '
                                         f"got {type(content).__name__}")
    texts = []
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequestError(f"{where}[{i}]", 'a content part must be {"type": "text", "text": "..."}; '
                                                       f"this server takes text only, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def template_message(message: dict, where: str) -> dict:
    """One message for the template; InvalidRequestError names the field at fault (e.g. 'messages[1].role')."""
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequestError(f"{where}.role", f"role must be one of {', '.join(ROLES)}, got {role!r}")
    unsupported = [key for key, value in message.items() if key not in MESSAGE_FIELDS and value is not None]
    if unsupported:
        raise InvalidRequestError(f"{where}.{unsupported[0]}", f"this server does not support {unsupported[0]!r} "
                                                               f"in messages (only {', '.join(MESSAGE_FIELDS)})")
    if "content" not in message:
        raise InvalidRequestError(f"{where}.content", "content is missing")
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequestError(f"{where}.name", f"name must be a string, got {type(name).__name__}")
    rendered = {"role": role, "content": content_text(message["content"], f"{where}.content")}
    return rendered | ({"name": name} if name is not None else {})


def template_messages(messages: list[dict]) -> list[dict]:
    """Every message of a request for the template; a request needs at least one."""
    if not messages:
        raise InvalidRequestError("messages", "at least one message is required")
    return [template_message(message, f"messages[{i}]") for i, message in enumerate(messages)]
