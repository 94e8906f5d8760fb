"""Typed errors: each carries its field, value or adapter name and stays the built-in error callers caught before;
the engine raises them; the server's one table answers each type with its status, OpenAI type and code, and a
request through the app gets every status of the table.

One small Engine (tiny fixture model, mesh 1x1) with a Scheduler thread that is never asked to generate: the
requests here are all refused before they run, or fail on purpose.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path

import httpx
import pytest

from bdlora_jax import Engine, errors
from bdlora_jax.adapters.peft_io import read_adapter
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.engine.sampler import SamplingParams
from bdlora_jax.engine.scheduler import Scheduler
from bdlora_jax.errors import (
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
    PoolFullError,
    RequestFailedError,
    RequestTooLargeError,
    ServerShuttingDownError,
)
from bdlora_jax.server import MAX_BODY_BYTES, create_app
from bdlora_jax.server.error_mapping import ERROR_KINDS, error_body, error_kind

SERVED = "tiny"
API_KEY = "sekret"
MAX_SEQ_LEN = 32

# every typed error: an instance, the attributes it carries, the built-in it also is, and its HTTP answer
# (status, OpenAI type, code, message)
CASES = [
    (InvalidRequestError("top_p", "top_p must be in (0, 1], got 2.0"), {"field": "top_p"}, ValueError,
     (400, "invalid_request_error", None, "invalid field 'top_p': top_p must be in (0, 1], got 2.0")),
    (ContextLengthError(30, 5, 32, "prompt of 30 tokens + max_tokens=5 exceeds max_seq_len=32"),
     {"field": "max_tokens", "prompt_tokens": 30, "max_tokens": 5, "max_seq_len": 32}, ValueError,
     (400, "invalid_request_error", "context_length_exceeded", ("prompt of 30 tokens + max_tokens=5 exceeds "
                                                               "max_seq_len=32"))),
    (MultiplePromptsError(), {"field": "prompt"}, ValueError,
     (400, "invalid_request_error", "multiple_prompts", "only one prompt per request is supported")),
    (MalformedBodyError("JSON decode error"), {"field": "body", "detail": "JSON decode error"}, ValueError,
     (400, "invalid_request_error", None, "malformed JSON body: JSON decode error")),
    (RequestTooLargeError(100, 250), {"limit": 100, "size": 250}, ValueError,
     (413, "invalid_request_error", "body_too_large", "request body of 250 bytes exceeds 100")),
    (AuthenticationError(), {}, Exception,
     (401, "authentication_error", "invalid_api_key", "missing or invalid API key (Authorization: Bearer ...)")),
    (ModelNotFoundError("nope"), {"model": "nope"}, LookupError,
     (404, "not_found_error", "model_not_found", "model 'nope' does not exist; see /v1/models")),
    (AdapterError("/a/adapter_config.json: missing", path="/a/adapter_config.json"),
     {"path": Path("/a/adapter_config.json")}, ValueError,
     (400, "invalid_request_error", "invalid_adapter", "/a/adapter_config.json: missing")),
    (AdapterConflictError("x", "adapter name 'x' is already in use"), {"name": "x"}, ValueError,
     (400, "invalid_request_error", "name_taken", "adapter name 'x' is already in use")),
    (AdapterNotFoundError("gone"), {"name": "gone"}, KeyError,
     (404, "not_found_error", "adapter_not_found", "adapter 'gone' is not registered")),
    (AdapterNotRemovableError("c0", "adapter 'c0' belongs to the compressed bank"), {"name": "c0"}, ValueError,
     (400, "invalid_request_error", "compressed_adapter", "adapter 'c0' belongs to the compressed bank")),
    (AdapterInUseError("busy"), {"name": "busy"}, RuntimeError,
     (409, "conflict_error", "adapter_in_use",
      "adapter 'busy' is used by running or waiting requests; unload it when they have finished")),
    (ForbiddenPathError("/etc/x", Path("/srv/loras")), {"path": "/etc/x", "root": Path("/srv/loras")}, Exception,
     (403, "permission_error", "forbidden_path", "lora_path '/etc/x' is outside the allowed --lora-root '/srv/loras'")),
    (ForbiddenPathError("/srv/loras/a/c.json", Path("/srv/loras"), Path("/etc/c.json")),
     {"path": "/srv/loras/a/c.json", "root": Path("/srv/loras"), "target": Path("/etc/c.json")}, Exception,
     (403, "permission_error", "forbidden_path",
      "'/srv/loras/a/c.json' resolves to '/etc/c.json', which is outside the allowed --lora-root '/srv/loras'")),
    (RequestFailedError("error"), {"reason": "error"}, RuntimeError,
     (500, "server_error", "error", "request ended: error")),
    (PoolFullError(2, "3 distinct adapters in one batch but max_loras=2"), {"capacity": 2}, RuntimeError,
     (500, "server_error", None, "3 distinct adapters in one batch but max_loras=2")),
    (ServerShuttingDownError(), {}, RuntimeError,
     (503, "service_unavailable_error", "shutting_down", "the server is shutting down and admits no new requests")),
    (PeerLostError("follower process 1: connection closed"), {}, RuntimeError,
     (503, "service_unavailable_error", "peer_lost", "follower process 1: connection closed")),
]


def test_every_typed_error_has_a_case():
    defined = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, BdloraError) and cls is not BdloraError}
    assert defined == {type(error) for error, *_ in CASES}


@pytest.mark.parametrize("error,attributes,builtin,answer", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_typed_error_carries_its_field_and_stays_a_builtin(error, attributes, builtin, answer):
    assert isinstance(error, BdloraError) and isinstance(error, builtin)
    for name, value in attributes.items():
        assert getattr(error, name) == value, name
    assert error.message == answer[3] or answer[3].endswith(error.message)
    assert error.message in str(error)


@pytest.mark.parametrize("error,attributes,builtin,answer", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_table_maps_each_type_to_its_status(error, attributes, builtin, answer):
    status, type_, code, message = answer
    assert error_kind(error).status == status
    assert error_body(error) == {"error": {"message": message, "type": type_, "code": code}}


def test_table_rows_are_for_typed_errors_and_the_nearest_class_wins():
    assert all(issubclass(cls, BdloraError) for cls in ERROR_KINDS)
    assert error_kind(BdloraError("anything")).status == 500

    class Narrower(AdapterInUseError):
        """A subclass without a row of its own."""

    assert error_kind(Narrower("n")) is ERROR_KINDS[AdapterInUseError]


# ---------------------------------------------------------------------------------------------- engine raise sites


@pytest.fixture(scope="module")
def engine(hf_dir):
    eng = Engine.from_pretrained(hf_dir / "model", mesh="1x1", strategy="replicated", max_loras=1, max_lora_rank=8,
                                 max_batch=2, max_seq_len=MAX_SEQ_LEN)
    eng.add_adapter("busy", random_adapter(eng.model_config, "busy", rank=4, seed=1))
    return eng


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("temperature", float("inf")),
                                         ("temperature", float("nan")), ("top_p", 0.0), ("top_k", -1),
                                         ("max_tokens", 0), ("seed", -1), ("stop_token_ids", (10**6,))])
def test_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value}).validate(64)
    assert info.value.field == field and info.value.message.startswith(field)


def test_engine_errors_carry_field_and_name(engine, tmp_path):
    with pytest.raises(InvalidRequestError) as info:
        engine.generate([[]])
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        engine.generate([[1]], adapters=[None, None])
    assert info.value.field == "adapters"
    with pytest.raises(ContextLengthError) as info:
        engine.generate([[1, 2, 3]], max_tokens=MAX_SEQ_LEN)
    assert (info.value.prompt_tokens, info.value.max_tokens, info.value.max_seq_len) == (3, MAX_SEQ_LEN, MAX_SEQ_LEN)
    with pytest.raises(AdapterNotFoundError) as info:
        engine.generate([[1]], adapters=["nope"])
    assert info.value.name == "nope"
    with pytest.raises(AdapterNotFoundError) as info:
        engine.remove_adapter("nope")
    assert info.value.name == "nope"
    with pytest.raises(AdapterConflictError) as info:
        engine.add_adapter("busy", random_adapter(engine.model_config, "busy", rank=4, seed=2))
    assert info.value.name == "busy"
    with pytest.raises(AdapterError) as info:
        read_adapter(tmp_path / "missing", engine.model_config)
    assert info.value.path == tmp_path / "missing"
    engine.pool.register("other", random_adapter(engine.model_config, "other", rank=4, seed=3))
    try:
        with pytest.raises(PoolFullError) as info:
            engine.pool.slots_for(["busy", "other"])
        assert info.value.capacity == 1
    finally:
        engine.pool.unregister("other")


# ---------------------------------------------------------------------------------------------- through the app


@pytest.fixture(scope="module")
def scheduler(engine):
    running = Scheduler(engine)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora_root")


@pytest.fixture(scope="module")
def app(engine, scheduler, lora_root):
    return create_app(engine, scheduler, SERVED, lora_root=lora_root)


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    """One request through the app (httpx's ASGI transport, no sockets)."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://errors.test",
                                     timeout=60) as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(go())


def answer(response: httpx.Response) -> tuple[int, str, str | None, str]:
    """(status, error type, error code, message) of an OpenAI error response."""
    error = response.json()["error"]
    return response.status_code, error["type"], error["code"], error["message"]


def test_400_invalid_field(app):
    response = call(app, "POST", "/v1/completions", json={"model": SERVED, "prompt": [1, 2], "top_p": 2})
    assert answer(response) == (400, "invalid_request_error", None,
                                "invalid field 'top_p': top_p must be in (0, 1], got 2.0")
    response = call(app, "POST", "/v1/completions", json={"model": SERVED, "prompt": [1, 2], "max_tokens": "x"})
    assert answer(response)[:3] == (400, "invalid_request_error", None)
    assert answer(response)[3].startswith("invalid field 'max_tokens': ")


def test_400_codes(app, lora_root):
    response = call(app, "POST", "/v1/completions", json={"model": SERVED, "prompt": [1] * 30, "max_tokens": 3})
    assert answer(response)[:3] == (400, "invalid_request_error", "context_length_exceeded")
    response = call(app, "POST", "/v1/load_lora_adapter", json={"lora_name": SERVED, "lora_path": str(lora_root)})
    assert answer(response) == (400, "invalid_request_error", "name_taken",
                                f"adapter name {SERVED!r} is already in use")
    response = call(app, "POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(lora_root / "x")})
    assert answer(response)[:3] == (400, "invalid_request_error", "invalid_adapter")
    assert str(lora_root / "x") in answer(response)[3]
    response = call(app, "POST", "/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert answer(response)[:3] == (400, "invalid_request_error", None)
    assert answer(response)[3].startswith("malformed JSON body: ")


def test_401_without_the_api_key(engine, scheduler):
    secured = create_app(engine, scheduler, SERVED, api_key=API_KEY)
    assert answer(call(secured, "GET", "/v1/models")) == (401, "authentication_error", "invalid_api_key",
                                                          AuthenticationError().message)


def test_403_outside_the_lora_root(app, lora_root, tmp_path):
    response = call(app, "POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert answer(response) == (403, "permission_error", "forbidden_path",
                                ForbiddenPathError(str(tmp_path), lora_root).message)


def test_404_unknown_model_and_adapter(app):
    response = call(app, "POST", "/v1/completions", json={"model": "nope", "prompt": [1]})
    assert answer(response) == (404, "not_found_error", "model_not_found", ModelNotFoundError("nope").message)
    response = call(app, "POST", "/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert answer(response) == (404, "not_found_error", "adapter_not_found", AdapterNotFoundError("nope").message)


def test_409_unloading_an_adapter_in_use(app, engine, scheduler, monkeypatch):
    monkeypatch.setattr(scheduler.generator, "adapters_in_use", lambda: {"busy"})
    response = call(app, "POST", "/v1/unload_lora_adapter", json={"lora_name": "busy"})
    assert answer(response) == (409, "conflict_error", "adapter_in_use", AdapterInUseError("busy").message)
    assert engine.has_adapter("busy")


def test_413_body_too_large(app):
    response = call(app, "POST", "/v1/completions", content=b" " * (MAX_BODY_BYTES + 1),
                    headers={"content-type": "application/json"})
    assert answer(response) == (413, "invalid_request_error", "body_too_large",
                                RequestTooLargeError(MAX_BODY_BYTES, MAX_BODY_BYTES + 1).message)


@pytest.fixture
def failing_submit(scheduler, monkeypatch):
    """Every submitted request fails as the scheduler fails one (finish_reason "error", then token None), once its
    handler waits for tokens."""

    def fail(request):
        request.finish_reason = "error"
        request.on_token(request, None)

    monkeypatch.setattr(scheduler, "submit", lambda request: asyncio.get_running_loop().call_soon(fail, request))


def test_500_request_failed(app, failing_submit):
    response = call(app, "POST", "/v1/completions", json={"model": SERVED, "prompt": [1, 2], "max_tokens": 2})
    assert answer(response) == (500, "server_error", "error", "request ended: error")
    response = call(app, "POST", "/v1/completions", json={"model": SERVED, "prompt": [1, 2], "max_tokens": 2,
                                                           "stream": True})
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200
    assert [json.loads(e) for e in events] == [error_body(RequestFailedError("error"))]
