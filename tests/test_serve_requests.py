"""Request handling of the HTTP server under hostile input: numbers out of range, invalid Unicode, stop-string
limits and their cost, long prompts, clients that leave, connections idle mid-request, and the shutdown drain.

Every refusal is a 4xx with an OpenAI error body naming the field, and a good request still succeeds afterwards.
One module-scoped Engine (demo model, mesh 1x1) is driven by its Scheduler thread; requests go through httpx's ASGI
transport, except where real sockets matter (uvicorn on a free port in a thread, over the same app).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from helpers import running_scheduler

from bdlora_jax import Engine
from bdlora_jax.server import completions, create_app
from bdlora_jax.server.completions import MAX_STOP_CHARS, MAX_STOP_STRINGS
from bdlora_jax.server.graceful import GracefulServer
from bdlora_jax.server.http_protocol import with_request_timeout
from bdlora_jax.server.prompt_length import keeps_length, max_chars_per_token
from bdlora_jax.text_stream import TextStream

pytestmark = pytest.mark.xdist_group("serve_requests")  # one worker builds the module's served engine once

MAX_SEQ_LEN = 128
SERVED = "demo"
GOOD = {"model": SERVED, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def served():
    engine = Engine.from_pretrained("demo", mesh="1x1", strategy="bdlora", max_loras=1, max_lora_rank=8,
                                    max_batch=4, max_seq_len=MAX_SEQ_LEN)
    with running_scheduler(engine, warm_up=False) as served:  # no warm-up: only the smallest prefill bucket compiles
        yield served


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve.test", timeout=120)


def post(app, path: str = "/v1/completions", **kwargs) -> httpx.Response:
    async def go():
        async with client(app) as c:
            return await c.post(path, **kwargs)

    return asyncio.run(go())


def post_raw(app, raw: str) -> httpx.Response:
    """POST a JSON text as written (escapes and number literals exactly as given)."""
    return post(app, content=raw.encode(), headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, status: int, *needles: str, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    for needle in needles:
        assert needle in body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body


def assert_serving(app) -> dict:
    response = post(app, json=GOOD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 3, body
    return body


# ---------------------------------------------------------------------------------------------- numbers and Unicode

BIG = "9" * 400
OUT_OF_RANGE = [
    # (id, the JSON body, the field named)
    ("temperature-400-digits", f'{{"model": "demo", "prompt": "Hi", "temperature": {BIG}}}', "temperature"),
    ("top_p-400-digits", f'{{"model": "demo", "prompt": "Hi", "top_p": {BIG}}}', "top_p"),
    ("temperature-1e999", '{"model": "demo", "prompt": "Hi", "temperature": 1e999}', "temperature"),
    ("top_p--1e999", '{"model": "demo", "prompt": "Hi", "top_p": -1e999}', "top_p"),
    ("temperature-Infinity", '{"model": "demo", "prompt": "Hi", "temperature": Infinity}', "temperature"),
    ("temperature-NaN", '{"model": "demo", "prompt": "Hi", "temperature": NaN}', "temperature"),
    ("max_tokens-400-digits", f'{{"model": "demo", "prompt": "Hi", "max_tokens": {BIG}}}', "max_tokens"),
    ("max_tokens-5000-digits", f'{{"model": "demo", "prompt": "Hi", "max_tokens": {"9" * 5000}}}', "max_tokens"),
    ("seed-2**64", f'{{"model": "demo", "prompt": "Hi", "seed": {2**64}}}', "seed"),
    ("top_k--2**70", f'{{"model": "demo", "prompt": "Hi", "top_k": {-(2**70)}}}', "top_k"),
    ("prompt-id-huge", f'{{"model": "demo", "prompt": [72, {BIG}]}}', "prompt.1"),
    ("stop_token_ids-huge", f'{{"model": "demo", "prompt": "Hi", "stop_token_ids": [{2**63}]}}', "stop_token_ids.0"),
]


@pytest.mark.parametrize("raw,field", [c[1:] for c in OUT_OF_RANGE], ids=[c[0] for c in OUT_OF_RANGE])
def test_numbers_out_of_range_name_the_field(app, raw, field):
    assert_error(post_raw(app, raw), 400, f"invalid field {field!r}", "finite number")
    assert_serving(app)


def test_largest_in_range_numbers_reach_the_usual_checks(app):
    """An integer just inside the 64-bit range is not refused as unrepresentable but by the field's own range."""
    assert_error(post_raw(app, f'{{"model": "demo", "prompt": "Hi", "seed": {2**63 - 1}}}'), 400, "seed must be in")
    assert_error(post_raw(app, '{"model": "demo", "prompt": "Hi", "temperature": 1e308}'), 400, "temperature")
    assert_error(post_raw(app, '{"model": "demo", "prompt": "Hi", "temperature": 1e39}'), 400, "temperature")
    assert post_raw(app, '{"model": "demo", "prompt": "Hi", "max_tokens": 2, "temperature": 1e38}').status_code == 200


LONE_SURROGATES = [
    ("prompt", '{"model": "demo", "prompt": "Hel\\ud800lo"}', "prompt"),
    ("prompt-batch", '{"model": "demo", "prompt": ["Hel\\udfffo"]}', "prompt.0"),
    ("model", '{"model": "de\\ud800mo", "prompt": "Hi"}', "model"),
    ("stop", '{"model": "demo", "prompt": "Hi", "stop": ["a", "\\ud83d"]}', "stop.1"),
]


@pytest.mark.parametrize("raw,field", [c[1:] for c in LONE_SURROGATES], ids=[c[0] for c in LONE_SURROGATES])
def test_lone_surrogates_are_refused(app, raw, field):
    assert_error(post_raw(app, raw), 400, f"invalid field {field!r}", "not valid Unicode")
    assert_serving(app)


def test_surrogate_pairs_are_text(app):
    """An escaped surrogate pair is one valid character (here an emoji), and completes as usual."""
    response = post_raw(app, '{"model": "demo", "prompt": "Hi \\ud83d\\ude00", "max_tokens": 2, "temperature": 0}')
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len("Hi 😀".encode())


def test_load_adapter_with_lone_surrogate(app):
    response = post(app, "/v1/load_lora_adapter", content=b'{"lora_name": "x\\ud800", "lora_path": "/nowhere"}',
                    headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid field 'lora_name'", "not valid Unicode")
    assert_serving(app)


# ---------------------------------------------------------------------------------------------- stop strings


@pytest.mark.parametrize("stop,needle", [
    ([f"s{i}" for i in range(MAX_STOP_STRINGS + 1)], f"at most {MAX_STOP_STRINGS} strings"),
    (["x" * (MAX_STOP_CHARS + 1)], f"at most {MAX_STOP_CHARS} characters"),
    ("y" * (MAX_STOP_CHARS + 1), f"at most {MAX_STOP_CHARS} characters"),
    ([f"{i}" for i in range(100_000)], "got 100000"),
], ids=["17-strings", "257-characters", "257-characters-one-string", "100000-strings"])
def test_stop_limits(app, stop, needle):
    assert_error(post(app, json={**GOOD, "stop": stop}), 400, "invalid field 'stop'", needle)
    assert_serving(app)


def test_stop_at_the_limits_completes(app):
    """16 stop strings of 256 characters each that never match: the usual output."""
    plain = assert_serving(app)
    stop = [chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]
    response = post(app, json={**GOOD, "stop": stop})
    assert response.status_code == 200, response.text
    assert response.json()["choices"] == plain["choices"]


class CountingTokenizer:
    """A stand-in tokenizer (one character per token id) recording how many tokens each decode call gets."""

    def __init__(self):
        self.calls: list[int] = []

    def decode(self, tokens):
        self.calls.append(len(tokens))
        return "".join(chr(t) for t in tokens)


def test_stream_decodes_and_searches_only_the_new_text():
    """Each step decodes a window of a couple of tokens, whatever the length of the text so far."""
    tokenizer = CountingTokenizer()
    stream = TextStream(tokenizer, ("xyz",))
    tokens = [ord("a") + i % 20 for i in range(3000)] + [ord(c) for c in "xyz tail"]
    pieces = [stream.delta(tokens[:i], final=i == len(tokens)) for i in range(1, len(tokens) + 1)]
    assert max(tokenizer.calls) <= 2
    assert "".join(pieces) == stream.text(tokens)[0] == "".join(chr(t) for t in tokens[:3000])


def test_stream_step_work_does_not_grow_with_the_text():
    """At the stop limits (16 stop strings of 256 characters that never match), over 16,000 tokens each step
    decodes at most two tokens and keeps (so searches) at most the longest stop string's reach of text."""
    stop = tuple(chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS))
    tokenizer = CountingTokenizer()
    stream, tokens, kept = TextStream(tokenizer, stop), [], []
    for i in range(16000):
        tokens.append(ord("a") + i % 20)
        stream.delta(tokens, final=False)
        kept.append(len(stream.tail))
    assert max(tokenizer.calls) <= 2 and max(kept) <= MAX_STOP_CHARS


def test_stop_strings_count_only_from_min_tokens_on():
    """As vLLM: a stop string in the text of the first min_tokens - 1 tokens does not stop, one after does; the
    streamed pieces and the whole text agree."""
    tokens = [ord(c) for c in "ab.cd.ef"]
    for min_tokens, want in ((0, "ab"), (3, "ab"), (4, "ab.cd"), (7, "ab.cd.ef")):
        stream = TextStream(CountingTokenizer(), (".",), min_tokens)
        pieces = [stream.delta(tokens[:i], final=i == len(tokens)) for i in range(1, len(tokens) + 1)]
        whole, stopped = TextStream(CountingTokenizer(), (".",), min_tokens).text(tokens)
        assert "".join(pieces) == whole == want and stopped == (want != "ab.cd.ef"), min_tokens


def test_stream_equals_whole_text_at_stop_strings():
    """Streamed pieces, cut at the first stop string, join to what the whole decode gives, over random texts."""
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab c😀é") for _ in range(rng.randint(1, 40)))
        tokens = [ord(c) for c in text]
        stop = tuple(rng.choice(["b c", "😀", "aa", "zz", "é a"]) for _ in range(rng.randint(0, 3)))
        stream = TextStream(CountingTokenizer(), stop)
        pieces = [stream.delta(tokens[:i], final=i == len(tokens)) for i in range(1, len(tokens) + 1)]
        assert "".join(pieces) == TextStream(CountingTokenizer(), stop).text(tokens)[0], (text, stop)


# ---------------------------------------------------------------------------------------------- long prompts


def test_chars_per_token_bound_of_the_demo_tokenizer(served):
    """The demo tokenizer's longest entry is '<pad>' (5 characters); no text tokenizes to fewer tokens than that
    bound says, even one made of the longest entries."""
    tokenizer = served[0].tokenizer
    longest = max_chars_per_token(tokenizer)
    assert longest == 5
    rng = random.Random(1)
    for text in ["<pad>" * 50, "</s><s>" * 30] + ["".join(rng.choice(["<pad>", "a", "é", " ", "😀"])
                                                          for _ in range(rng.randint(1, 80))) for _ in range(200)]:
        assert len(tokenizer.encode(text).ids) >= math.ceil(len(text) / longest), text


def test_normalizers_that_shorten_text_give_no_bound():
    assert keeps_length(None) and keeps_length({"type": "Prepend", "prepend": "▁"})
    assert keeps_length({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
    assert not keeps_length({"type": "NFC"}) and not keeps_length({"type": "Strip", "strip_left": True})
    assert not keeps_length({"type": "Replace", "pattern": {"String": "  "}, "content": " "})
    assert not keeps_length({"type": "Sequence", "normalizers": [{"type": "NFKC"}]})


def test_overlong_text_prompt_is_refused_before_tokenizing(app, monkeypatch):
    """Beyond 5 characters a token times max_seq_len - 1 tokens, a text prompt is refused without tokenizing it."""

    def no_tokenizing(*_):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(completions, "prompt_ids", no_tokenizing)
    limit = 5 * (MAX_SEQ_LEN - 1)
    for prompt in ("x" * (limit + 1), ["x" * (3 * 1024 * 1024)]):
        assert_error(post(app, json={**GOOD, "prompt": prompt}), 400, "characters", f"max_seq_len={MAX_SEQ_LEN}",
                     code="context_length_exceeded")
    monkeypatch.undo()
    # at the bound it is tokenized, and refused by its token count
    assert_error(post(app, json={**GOOD, "prompt": "x" * limit}), 400, f"prompt of {limit} tokens",
                 code="context_length_exceeded")
    assert_serving(app)


def test_tokenizing_runs_off_the_event_loop(app, monkeypatch):
    """While one request's prompt is being tokenized (slowly), /health answers: before the tokenizing ends."""
    real, entered, times = completions.prompt_ids, threading.Event(), {}

    def slow_prompt_ids(engine, prompt):
        entered.set()
        time.sleep(1.5)
        times["tokenized"] = time.perf_counter()
        return real(engine, prompt)

    monkeypatch.setattr(completions, "prompt_ids", slow_prompt_ids)

    async def go():
        async with client(app) as c:
            slow = asyncio.create_task(c.post("/v1/completions", json=GOOD))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            health = await c.get("/health")
            times["health"] = time.perf_counter()
            return health, await slow

    health, slow = asyncio.run(go())
    assert health.status_code == 200 and times["health"] < times["tokenized"], times
    assert slow.status_code == 200, slow.text


def test_health_answers_while_a_4mb_prompt_is_handled(app):
    """A prompt of nearly 4 MiB is refused by its length without tokenizing it (seconds), and /health meanwhile
    answers at once."""

    async def go():
        async with client(app) as c:
            big = asyncio.create_task(c.post("/v1/completions", json={**GOOD, "prompt": "word " * 800_000}))
            waits = []
            while not big.done():
                start = time.perf_counter()
                assert (await c.get("/health")).status_code == 200
                waits.append(time.perf_counter() - start)
                await asyncio.sleep(0.01)
            return await big, waits

    big, waits = asyncio.run(go())
    assert_error(big, 400, "4000000 characters", code="context_length_exceeded")
    assert max(waits) < 1.0, waits


@pytest.mark.parametrize("length,status", [("abc", 200), ("-5", 200), ("4194305", 413), ("9" * 5000, 413)])
def test_odd_content_length_headers(app, length, status):
    """A Content-Length that is not a number is left to the HTTP server; one too large, however long, is 413."""
    response = post(app, content=json.dumps(GOOD).encode(),
                     headers={"content-type": "application/json", "content-length": length})
    assert response.status_code == status, response.text
    if status == 413:
        assert_error(response, 413, "exceeds 4194304", code="body_too_large")


def test_deeply_nested_body_is_a_client_error(app):
    response = post_raw(app, "[" * 100_000 + "]" * 100_000)
    assert 400 <= response.status_code < 500, response.text
    assert_serving(app)


# ---------------------------------------------------------------------------------------------- clients that leave


def test_non_streaming_request_is_cancelled_when_its_client_leaves(app, served, monkeypatch):
    """The client disconnects 0.3 s into a long non-streaming request: its row is freed long before max_tokens."""
    _, scheduler = served
    submitted = []
    real_submit, real_step = scheduler.submit, scheduler.generator.step

    def slow_step():
        time.sleep(0.02)  # so the request cannot finish before the client leaves
        return real_step()

    monkeypatch.setattr(scheduler, "submit", lambda request: (submitted.append(request), real_submit(request)))
    monkeypatch.setattr(scheduler.generator, "step", slow_step)
    body = json.dumps({"model": SERVED, "prompt": "Hi", "max_tokens": MAX_SEQ_LEN - 10, "temperature": 0,
                       "ignore_eos": True}).encode()
    sent = []

    async def go():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.3)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"serve.test")],
                 "client": ("127.0.0.1", 1), "server": ("serve.test", 80)}
        await asyncio.wait_for(app(scope, receive, send), timeout=60)

    start = time.perf_counter()
    asyncio.run(go())
    assert time.perf_counter() - start < 0.02 * (MAX_SEQ_LEN - 10)
    (request,) = submitted
    assert request.finish_reason == "abort" and len(request.output) < MAX_SEQ_LEN - 10
    deadline = time.monotonic() + 10
    while scheduler.counts() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.counts() == (0, 0)
    monkeypatch.undo()
    assert_serving(app)


# ---------------------------------------------------------------------------------------------- live sockets


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """A GracefulServer over `app` on a free port, run in a thread (signals are sent by calling handle_exit)."""

    def __init__(self, app, request_timeout: float, shutdown_timeout: float = 30.0):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,  # its records reach caplog
                                http=with_request_timeout(request_timeout))
        self.server = GracefulServer(config, app.state.drain, shutdown_timeout)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes the connection within `timeout` seconds (without sending anything)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_idle_mid_request_are_closed(served, caplog):
    """50 connections sending half a request (or nothing) are closed after the request timeout, with no error logged;
    a complete request on a connection that sends promptly still succeeds."""
    app = create_app(*served, SERVED)
    half_requests = [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le",  # half the headers
        b"POST /v1/compl",  # half the request line
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        + b'\r\n{"model": "demo", ',  # half the body
        b"",  # nothing at all
    ]
    with ThreadedServer(app, request_timeout=1.0) as server:
        sockets = []
        for i in range(50):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(half_requests[i % len(half_requests)])
            sockets.append(sock)
        start = time.monotonic()
        try:
            assert all(closed_by_peer(sock, timeout=15) for sock in sockets)
        finally:
            for sock in sockets:
                sock.close()
        assert 0.5 < time.monotonic() - start < 15
        response = httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3, response.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-4000:]


def test_drain_refuses_new_requests_and_finishes_those_in_flight(served):
    """On the exit signal: a stream in flight runs to its end, a new request gets 503 with an error body, and the
    server stops once nothing is in flight."""
    app = create_app(*served, SERVED)
    with ThreadedServer(app, request_timeout=30, shutdown_timeout=60) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c, \
                c.stream("POST", "/v1/completions", json={**GOOD, "max_tokens": 40, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.server.handle_exit(15, None)
            refused = httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=30)
            assert_error(refused, 503, "shutting down", code="shutting_down")
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        server.thread.join(timeout=30)
        assert not server.thread.is_alive()
