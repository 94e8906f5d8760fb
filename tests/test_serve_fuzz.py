"""Property-based fuzzing of every POST endpoint the app's OpenAPI schema lists: no body gets a 5xx.

Bodies are drawn from each endpoint's request schema (app.openapi(), so endpoints added later are fuzzed too), with
values that stray from it: wrong types, numbers beyond float and 64-bit range, NaN and Infinity, lone surrogates,
long strings, extra and missing fields, bodies that are not objects or not JSON. Field names the server knows
(model, lora_name, lora_path, max_tokens) draw from values that reach past the first check often. The seed is fixed
(derandomize) and the number of examples per endpoint is bounded; one module-scoped Engine (demo model, mesh 1x1,
tiny max_seq_len, no warm-up) serves them through httpx's ASGI transport, with --lora-root set to a temporary
directory that holds one good adapter.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdlora_jax import Engine
from bdlora_jax.adapters.peft_io import write_adapter
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.engine.scheduler import Scheduler
from bdlora_jax.server import create_app

pytestmark = pytest.mark.xdist_group("serve_fuzz")  # one worker builds the module's served engine once

SERVED = "demo"
MAX_SEQ_LEN = 32
DRAWN_EXAMPLES = 100  # per endpoint: bodies drawn from its schema (ordinary, cut off, extra fields, not JSON)
FIELD_EXAMPLES = 40  # per field of each endpoint: a good body with that field stray

# ---------------------------------------------------------------------------------------------- the served app


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_lora_root")


@pytest.fixture(scope="module")
def app(lora_root):
    engine = Engine.from_pretrained("demo", mesh="1x1", strategy="bdlora", max_loras=2, max_lora_rank=8, max_batch=4,
                                    max_seq_len=MAX_SEQ_LEN)
    write_adapter(random_adapter(engine.model_config, "good", rank=2, seed=1), lora_root / "good")
    scheduler = Scheduler(engine)  # no warm-up: short prompts compile the smallest prefill bucket only
    scheduler.start()
    yield create_app(engine, scheduler, SERVED, lora_root=lora_root)
    scheduler.stop()


def post_endpoints(app) -> list[tuple[str, dict]]:
    """(path, JSON schema of its body) of every POST endpoint in the app's OpenAPI schema."""
    paths = app.openapi()["paths"]
    found = []
    for path, methods in paths.items():
        if "post" in methods:
            content = methods["post"].get("requestBody", {}).get("content", {})
            found.append((path, content.get("application/json", {}).get("schema", {})))
    return found


# ---------------------------------------------------------------------------------------------- strategies

HUGE_INTS = [2**63, -(2**63) - 1, 2**64, 10**400, -(10**400), 2**31, -1, 0]
ODD_FLOATS = [float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 1e39, 5e-324, -0.0, 0.5, 1.0, 2.0]
ODD_STRINGS = ["", "\ud800", "a\udfffb", "\ud83d\ude00", "<pad>", "</s>", "x" * 300, "\x00", "é" * 40, "../.."]
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def text_values() -> st.SearchStrategy:
    """Short strings of any code point (lone surrogates included), and known troublemakers."""
    return st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(ODD_STRINGS)


def named_values(lora_root: Path) -> dict[str, st.SearchStrategy]:
    """Ordinary values for the field names the server knows, that often get past the first check (their odd values
    come from the schema's types)."""
    names = st.sampled_from([SERVED] * 6 + ["good", "fuzzed", "no-such-model"])
    paths = st.sampled_from([str(lora_root / "good"), str(lora_root / "missing"), str(lora_root), "/", "/etc",
                             str(lora_root / ".." / "x"), "relative/path"])
    return {"model": names, "lora_name": names | st.text(st.characters(codec="ascii"), max_size=8),
            "lora_path": paths, "max_tokens": st.integers(1, 4), "n": st.sampled_from([1, 1, 1, 2]),
            "top_p": st.floats(0.05, 1)}


def resolve(schema: dict, components: dict) -> dict:
    """A schema with its $ref followed."""
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def plain_values(kind: str | None) -> st.SearchStrategy:
    """Ordinary values of a JSON type, which pass most checks."""
    return {"integer": st.integers(0, 4), "number": st.floats(0, 2), "boolean": st.booleans(), "null": st.none(),
            "string": st.text(st.characters(codec="ascii"), min_size=1, max_size=8)}.get(kind, ANY_JSON)


def odd_values(kind: str | None) -> st.SearchStrategy:
    """Values of a JSON type that stray from what a field expects: out of range, non-finite, invalid Unicode."""
    return {"integer": st.sampled_from(HUGE_INTS) | st.integers(),
            "number": st.sampled_from(ODD_FLOATS + HUGE_INTS) | st.floats(),
            "string": st.sampled_from(ODD_STRINGS) | text_values()}.get(kind, ANY_JSON)


def from_schema(schema: dict, components: dict, named: dict, odd: bool = False, depth: int = 0) -> st.SearchStrategy:
    """Values the schema describes: ordinary ones, or (odd) ones of its types that stray from what is expected."""
    schema = resolve(schema, components)
    if depth > 4:
        return JSON_SCALARS

    def inner(sub: dict, odd_inner: bool = odd) -> st.SearchStrategy:
        """Values of a part of this schema."""
        return from_schema(sub, components, named, odd_inner, depth + 1)

    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([inner(s) for s in schema.get("anyOf", schema.get("oneOf"))])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        properties, required = schema.get("properties", {}), set(schema.get("required", ()))
        fields = {k: named[k] if k in named and not odd else inner(v) for k, v in properties.items()}
        return st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                     optional={k: v for k, v in fields.items() if k not in required})
    if kind == "array":
        items = schema.get("items", {})
        if odd:  # a long list, or one with an odd item among ordinary ones
            return st.lists(inner(items, False), min_size=17, max_size=40) | \
                st.lists(inner(items, False) | inner(items, True), min_size=1, max_size=4)
        return st.lists(inner(items), max_size=4)
    return odd_values(kind) if odd else plain_values(kind)


def stray_field(schema: dict, components: dict, named: dict, good: dict | None, key: str) -> st.SearchStrategy:
    """A body of ordinary values (often the endpoint's known good body) whose field `key` holds an odd value of its
    types or a value of any type, or is removed."""
    schema = resolve(schema, components)
    base = from_schema(schema, components, named)
    if good is not None:
        base = st.one_of(*[st.just(good)] * 4, base)
    odd = from_schema(schema["properties"][key], components, named, odd=True)
    value = st.one_of(odd, odd, odd, ANY_JSON, st.just(REMOVED))
    return st.builds(lambda doc, v: {k: x for k, x in doc.items() if k != key} | ({} if v is REMOVED else {key: v}),
                     base, value)


REMOVED = object()  # marks a field a stray body leaves out


def encoded(documents: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """The documents as JSON text (NaN and Infinity as such, lone surrogates escaped)."""
    return documents.map(lambda doc: json.dumps(doc, allow_nan=True).encode())


def bodies(schema: dict, components: dict, named: dict) -> st.SearchStrategy[bytes]:
    """Request bodies: ordinary JSON from the schema, with extra fields, any JSON, cut-off JSON or bytes that are not
    JSON."""
    ordinary = encoded(from_schema(schema, components, named))
    cut = ordinary.flatmap(lambda raw: st.integers(0, len(raw)).map(lambda n: raw[:n]))
    extra = encoded(st.builds(lambda doc, more: {**more, **doc} if isinstance(doc, dict) else doc,
                              from_schema(schema, components, named), st.dictionaries(st.text(max_size=6), ANY_JSON,
                                                                                      max_size=2)))
    return st.one_of(ordinary, extra, encoded(ANY_JSON), cut, st.binary(max_size=40))


# ---------------------------------------------------------------------------------------------- the property


def good_bodies(lora_root: Path) -> dict[str, dict]:
    """A body each known endpoint accepts, for the fuzzer to stray from (later endpoints stray from drawn ones)."""
    return {"/v1/completions": {"model": SERVED, "prompt": "Hello", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9,
                                "top_k": 3, "seed": 1, "stop": ["xyz"], "stop_token_ids": [1], "stream": False,
                                "n": 1},
            "/v1/chat/completions": {"model": SERVED, "messages": [{"role": "user", "content": "Hello"}],
                                     "max_tokens": 2, "temperature": 0.5, "logprobs": True, "top_logprobs": 2},
            "/v1/load_lora_adapter": {"lora_name": "fuzzed", "lora_path": str(lora_root / "good")},
            "/v1/unload_lora_adapter": {"lora_name": "fuzzed"}}


def never_a_server_error(app, path: str, strategy: st.SearchStrategy[bytes], examples: int) -> None:
    """Post `examples` bodies drawn from `strategy` to `path`; every answer is below 500 (streams read to the end)."""

    async def send(body: bytes) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fuzz.test", timeout=60) as c, \
                c.stream("POST", path, content=body, headers={"content-type": "application/json"}) as r:
            await r.aread()
            return r.status_code

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def check(body: bytes):
        status = asyncio.run(send(body))
        assert status < 500, (path, body[:500])

    check()


def fuzz_endpoint(app, path: str, schema: dict, lora_root: Path) -> None:
    """Fuzz one endpoint: bodies drawn from its schema, then each of its fields holding stray values in turn."""
    components = app.openapi().get("components", {}).get("schemas", {})
    named, good = named_values(lora_root), good_bodies(lora_root).get(path)
    never_a_server_error(app, path, bodies(schema, components, named), DRAWN_EXAMPLES)
    for key in resolve(schema, components).get("properties", {}):
        never_a_server_error(app, path, encoded(stray_field(schema, components, named, good, key)), FIELD_EXAMPLES)


# the schema does not depend on the engine, so the endpoints are known when tests are collected
POST_PATHS = [path for path, _ in post_endpoints(create_app(None, None, SERVED))]


def test_post_endpoints_are_listed():
    """The schema lists the endpoints this module must at least cover (any endpoint added later is fuzzed too)."""
    assert {"/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter"} <= set(POST_PATHS)


@pytest.mark.parametrize("path", POST_PATHS)
def test_no_body_gets_a_server_error(app, lora_root, path):
    fuzz_endpoint(app, path, dict(post_endpoints(app))[path], lora_root)
