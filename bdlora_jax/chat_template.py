"""Hugging Face chat templates: read from a model directory and rendered with jinja2 the way transformers does.

A template is untrusted code from the model's files, so it runs in jinja2's immutable sandbox, with the settings and
helpers transformers gives it (trim_blocks, lstrip_blocks, loop controls, raise_exception, tojson, strftime_now and
the special tokens as variables), so a conversation renders to the same prompt text as apply_chat_template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidRequestError

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """A model's chat template that cannot be read or compiled; the message names the file."""


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        """The block's body, rendered as it stands."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def raise_exception(message: str):
    """What a template calls to refuse a conversation (e.g. roles that do not alternate)."""
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """JSON without jinja2's HTML escaping, as transformers' filter writes it."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    """The current local time in `format` (templates that print today's date use it)."""
    return datetime.now().strftime(format)


def template_environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed jinja2 environment of transformers' chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template, the special tokens it may print, and the file it came from (for messages)."""

    source: str
    where: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        """Compile once; a template that does not parse is refused naming its file."""
        try:
            object.__setattr__(self, "compiled", template_environment().from_string(self.source))
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.where}: chat_template does not compile: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation; InvalidRequestError('messages') when the template refuses it."""
        try:
            return self.compiled.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise InvalidRequestError("messages", f"the chat template refused the conversation: {e}") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an added-token object with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_source(config: dict, config_path: Path) -> str | None:
    """`chat_template` of tokenizer_config.json: a string, or a list of named templates (the 'default' one)."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ChatTemplateError(f"{config_path}: chat_template must be a string or a list of {{name, template}} "
                            "with a 'default' one")


def load_chat_template(path: str | Path) -> ChatTemplate | None:
    """The chat template of a model directory (tokenizer_config.json's `chat_template`, else chat_template.jinja),
    or None if it has neither."""
    path = Path(path)
    config_path = path / TOKENIZER_CONFIG
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ChatTemplateError(f"{config_path}: expected a JSON object")
    special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
    source = _template_source(config, config_path)
    if source is not None:
        return ChatTemplate(source, str(config_path), special)
    if (path / TEMPLATE_FILE).is_file():
        return ChatTemplate((path / TEMPLATE_FILE).read_text(), str(path / TEMPLATE_FILE), special)
    return None
