"""The OpenAI chat surface, in process: /v1/chat/completions through the official `openai` client (whole and
streamed, base model and adapter), n choices, echo, usage and stream_options.include_usage on both endpoints,
and 400s naming the field for bad messages and fields the server does not implement.

One module-scoped Engine (demo model, whose tokenizer_config.json carries a chat template) is driven by its Scheduler
thread as the server runs it; requests go through httpx's ASGI transport (no sockets).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from helpers import running_scheduler

from bdlora_jax import Engine
from bdlora_jax.demo import demo_adapters

pytestmark = pytest.mark.xdist_group("serve_chat")  # one worker builds the module's served engine once

ENGINE_OPTS = dict(mesh="1x1", strategy="replicated", max_loras=2, max_lora_rank=16, max_batch=4, max_seq_len=128)
MAX_SEQ_LEN = ENGINE_OPTS["max_seq_len"]
SERVED = "demo"
ADAPTER = min(demo_adapters())
CONVERSATION = [
    {"role": "system", "content": "Copy the word."},
    {"role": "user", "content": "apple="},
    {"role": "assistant", "content": "apple"},
    {"role": "user", "content": [{"type": "text", "text": "pear="}, {"type": "text", "text": "now"}]},
]


@pytest.fixture(scope="module")
def served():
    engine = Engine.from_pretrained("demo", **ENGINE_OPTS)
    engine.add_adapter(ADAPTER, demo_adapters()[ADAPTER])
    with running_scheduler(engine, warm_up=False) as served:  # no warm-up: only the shapes used get compiled
        yield served


def http_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve.test", timeout=120)


def post(app, path: str, body: dict) -> httpx.Response:
    """POST a JSON body; generation runs past EOS (ignore_eos) unless the body says otherwise, so max_tokens pins
    the lengths these tests count."""
    if isinstance(body, dict):
        body = {"ignore_eos": True, **body}

    async def go():
        async with http_client(app) as c:
            return await c.post(path, json=body)

    return asyncio.run(go())


def events(response: httpx.Response) -> list:
    """The data of each server-sent event, [DONE] last."""
    assert response.status_code == 200, response.text
    data = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def openai_client(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://serve.test/v1", api_key="x", max_retries=0,
                              http_client=http_client(app))


def rendered(engine, messages=CONVERSATION, add_generation_prompt=True) -> str:
    """The prompt the chat template makes of the messages (list content joined by newlines)."""
    plain = [{**m, "content": m["content"] if isinstance(m["content"], str) else
              "\n".join(p["text"] for p in m["content"])} for m in messages]
    return engine.chat_template.render(plain, add_generation_prompt)


def assert_error(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------- chat completions


@pytest.mark.parametrize("model", [SERVED, ADAPTER])
def test_openai_client_chat(app, engine, model):
    """Whole and streamed answers through the openai client; the stream's text and usage equal the whole answer's."""
    prompt_tokens = len(engine.tokenizer.encode(rendered(engine), add_special_tokens=False).ids)

    async def go():
        async with openai_client(app) as client:
            whole = await client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=10,
                                                         temperature=0, extra_body={"ignore_eos": True})
            stream = await client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=10,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True},
                                                          extra_body={"ignore_eos": True})
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(go())
    assert whole.object == "chat.completion" and whole.model == model and whole.id.startswith("chatcmpl-")
    (choice,) = whole.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert whole.usage.prompt_tokens == prompt_tokens and whole.usage.completion_tokens == 10
    assert whole.usage.total_tokens == prompt_tokens + 10
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    assert "".join(c.choices[0].delta.content or "" for c in content) == choice.message.content
    assert [c.choices[0].finish_reason for c in content][-1] == "length"


@pytest.mark.parametrize("model", [SERVED, ADAPTER])
def test_greedy_chat_equals_completion_of_rendered_prompt(app, engine, model):
    chat = post(app, "/v1/chat/completions", {"model": model, "messages": CONVERSATION, "max_tokens": 12,
                                              "temperature": 0}).json()
    completion = post(app, "/v1/completions", {"model": model, "prompt": rendered(engine), "max_tokens": 12,
                                               "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    assert chat["usage"] == completion["usage"]


@pytest.mark.parametrize("model", [SERVED, ADAPTER])
def test_chat_logprobs_equal_the_completion_logprobs_of_the_rendered_prompt(app, engine, model):
    """Chat's logprobs (OpenAI's chat format) carry the same tokens, log-probabilities and top tokens as the legacy
    logprobs of a completion of the rendered prompt, whole and joined over a stream."""
    chat_body = {"model": model, "messages": CONVERSATION, "max_tokens": 6, "temperature": 0, "logprobs": True,
                 "top_logprobs": 3}
    chat = post(app, "/v1/chat/completions", chat_body).json()["choices"][0]
    legacy = post(app, "/v1/completions", {"model": model, "prompt": rendered(engine), "max_tokens": 6,
                                           "temperature": 0, "logprobs": 3}).json()["choices"][0]["logprobs"]
    content = chat["logprobs"]["content"]
    assert [c["token"] for c in content] == legacy["tokens"]
    assert [c["logprob"] for c in content] == legacy["token_logprobs"]
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    for entry, top in zip(content, legacy["top_logprobs"]):
        assert len(entry["top_logprobs"]) == 3
        assert {t["token"]: t["logprob"] for t in entry["top_logprobs"]}.items() <= top.items()
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][-1]["logprob"]
    streamed = [e["choices"][0]["logprobs"] for e in events(post(app, "/v1/chat/completions",
                                                                 {**chat_body, "stream": True}))]
    assert [c for chunk in streamed if chunk for c in chunk["content"]] == content
    plain = post(app, "/v1/chat/completions", {**chat_body, "logprobs": False, "top_logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == chat["message"]["content"]


def test_echo_with_logprobs_is_refused_by_name(app):
    """The prompt's own logprobs are not computed, so echo with logprobs is a 400, never an answer without them."""
    response = post(app, "/v1/completions", {"model": SERVED, "prompt": "Hi", "max_tokens": 2, "echo": True,
                                             "logprobs": 1})
    assert_error(response, 400, "echo", "logprobs")
    assert post(app, "/v1/completions", {"model": SERVED, "prompt": "Hi", "max_tokens": 2,
                                         "echo": True}).json()["choices"][0]["text"].startswith("Hi")


def test_top_logprobs_needs_logprobs(app):
    response = post(app, "/v1/chat/completions", {"model": SERVED, "messages": CONVERSATION, "top_logprobs": 2})
    assert_error(response, 400, "top_logprobs", "logprobs=true")
    response = post(app, "/v1/chat/completions", {"model": SERVED, "messages": CONVERSATION, "logprobs": True,
                                                  "top_logprobs": 21, "max_tokens": 2})
    assert_error(response, 400, "logprobs", "21")


def test_adapter_changes_the_reply(app):
    replies = {model: post(app, "/v1/chat/completions", {"model": model, "messages": CONVERSATION, "max_tokens": 12,
                                                         "temperature": 0}).json()["choices"][0]["message"]["content"]
               for model in (SERVED, ADAPTER)}
    assert replies[SERVED] != replies[ADAPTER]


def test_add_generation_prompt_false(app, engine):
    chat = post(app, "/v1/chat/completions", {"model": SERVED, "messages": CONVERSATION, "max_tokens": 4,
                                              "temperature": 0, "add_generation_prompt": False}).json()
    completion = post(app, "/v1/completions", {"model": SERVED, "prompt": rendered(engine, CONVERSATION, False),
                                               "max_tokens": 4, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]


def test_reply_fills_the_context_without_max_tokens(app):
    body = post(app, "/v1/chat/completions", {"model": SERVED, "messages": CONVERSATION, "temperature": 0,
                                              "max_completion_tokens": None}).json()
    assert body["choices"][0]["finish_reason"] == "length", body
    assert body["usage"]["total_tokens"] == MAX_SEQ_LEN


def test_max_completion_tokens(app):
    body = post(app, "/v1/chat/completions", {"model": SERVED, "messages": CONVERSATION, "temperature": 0,
                                              "max_tokens": 9, "max_completion_tokens": 3}).json()
    assert body["usage"]["completion_tokens"] == 3


def test_chat_n_streamed(app):
    """Every choice opens with the assistant's role and ends with its finish reason; greedy choices agree."""
    base = {"model": SERVED, "messages": CONVERSATION, "max_tokens": 5, "temperature": 0, "n": 2}
    whole = post(app, "/v1/chat/completions", base).json()
    chunks = events(post(app, "/v1/chat/completions", {**base, "stream": True}))
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert whole["usage"]["completion_tokens"] == 10
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length" and all(m["finish_reason"] is None for m in mine[:-1])
        text = "".join(m["delta"].get("content", "") for m in mine)
        assert text == whole["choices"][index]["message"]["content"] == whole["choices"][0]["message"]["content"]


def test_stop_strings_in_chat(app):
    base = {"model": SERVED, "messages": CONVERSATION, "max_tokens": 12, "temperature": 0}
    text = post(app, "/v1/chat/completions", base).json()["choices"][0]["message"]["content"]
    stop = text[3:5]
    assert stop, text
    body = post(app, "/v1/chat/completions", {**base, "stop": stop}).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == text[:text.index(stop)]


BAD_CHATS = [
    # (id, body fields over a good request, needles in the message)
    ("no-messages", {"messages": []}, ["messages", "at least one"]),
    ("messages-not-list", {"messages": "hi"}, ["messages"]),
    ("message-not-object", {"messages": ["hi"]}, ["messages.0"]),
    ("role-tool", {"messages": [{"role": "tool", "content": "x"}]}, ["messages[0].role", "'tool'"]),
    ("role-missing", {"messages": [{"content": "x"}]}, ["messages[0].role", "None"]),
    ("content-missing", {"messages": [{"role": "user"}]}, ["messages[0].content", "missing"]),
    ("content-number", {"messages": [{"role": "user", "content": 3}]}, ["messages[0].content", "int"]),
    ("content-image", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     ["messages[0].content[0]", "image_url"]),
    ("content-part-no-text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     ["messages[0].content[0]"]),
    ("tool-calls", {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]},
     ["messages[0].tool_calls"]),
    ("name-number", {"messages": [{"role": "user", "content": "x", "name": 5}]}, ["messages[0].name"]),
    ("tools", {"tools": [{"type": "function"}]}, ["tools", "does not support"]),
    ("best_of", {"best_of": 2}, ["best_of", "does not support"]),
    ("n-0", {"n": 0}, ["'n'", "0"]),
    ("n-too-many", {"n": 129}, ["'n'", "129"]),
    ("stream_options-without-stream", {"stream_options": {"include_usage": True}}, ["stream_options", "stream"]),
    ("stream_options-unknown", {"stream": True, "stream_options": {"continuous": True}},
     ["stream_options.continuous"]),
    ("max_tokens-0", {"max_tokens": 0}, ["max_tokens", "0"]),
    ("max_completion_tokens-0", {"max_completion_tokens": 0}, ["max_completion_tokens", "0"]),
    ("context", {"max_completion_tokens": MAX_SEQ_LEN}, ["max_tokens", str(MAX_SEQ_LEN)]),
    ("temperature-negative", {"temperature": -1}, ["temperature"]),
]


@pytest.mark.parametrize("fields,needles", [b[1:] for b in BAD_CHATS], ids=[b[0] for b in BAD_CHATS])
def test_bad_chat_requests(app, fields, needles):
    body = {"model": SERVED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    assert_error(post(app, "/v1/chat/completions", body), 400, *needles)


def test_unknown_model(app):
    assert_error(post(app, "/v1/chat/completions", {"model": "nope", "messages": CONVERSATION}), 404, "nope")


def test_model_without_chat_template(app, engine, monkeypatch):
    monkeypatch.setattr(engine, "chat_template", None)
    assert_error(post(app, "/v1/chat/completions", {"model": ADAPTER, "messages": CONVERSATION}), 400,
                 "'model'", ADAPTER, "chat template")


def test_user_and_name_are_accepted(app):
    named = {**CONVERSATION[1], "name": "ann", "tool_calls": None}
    body = {"model": SERVED, "max_tokens": 2, "user": "someone", "messages": [CONVERSATION[0], named, *CONVERSATION[2:]]}
    assert post(app, "/v1/chat/completions", body).status_code == 200
    assert post(app, "/v1/completions", {"model": SERVED, "prompt": "Hello", "max_tokens": 2, "user": "x"}
                ).status_code == 200


# ---------------------------------------------------------------------------------------------- completions: n, echo, usage


def complete(app, **fields) -> dict:
    response = post(app, "/v1/completions", {"model": SERVED, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_n_choices(app):
    """n seeded sampled choices: indexes 0..n-1, each reproducible as a request of its own with seed+i."""
    body = complete(app, prompt="Hello", max_tokens=8, temperature=1.5, seed=11, n=3)
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len(set(texts)) > 1, texts
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 24, "total_tokens": 29}
    assert [c["text"] for c in complete(app, prompt="Hello", max_tokens=8, temperature=1.5, seed=11, n=3)["choices"]
            ] == texts
    for i, text in enumerate(texts):
        assert complete(app, prompt="Hello", max_tokens=8, temperature=1.5, seed=11 + i)["choices"][0]["text"] == text


def test_n_greedy_choices_agree(app):
    texts = {c["text"] for c in complete(app, prompt="apple=", max_tokens=6, temperature=0, n=3)["choices"]}
    assert len(texts) == 1


def test_n_seed_past_the_limit(app):
    assert_error(post(app, "/v1/completions", {"model": SERVED, "prompt": "Hi", "seed": 2**31 - 2, "n": 3}), 400,
                 "seed")


@pytest.mark.parametrize("prompt", ["apple=", [97, 112, 112, 108, 101, 61]])
def test_echo(app, prompt):
    plain = complete(app, prompt=prompt, max_tokens=6, temperature=0)["choices"][0]["text"]
    echoed = complete(app, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == "apple=" + plain
    assert echoed["usage"]["prompt_tokens"] == 6 and echoed["usage"]["completion_tokens"] == 6
    chunks = events(post(app, "/v1/completions", {"model": SERVED, "prompt": prompt, "max_tokens": 6,
                                                  "temperature": 0, "echo": True, "stream": True}))
    assert chunks[0]["choices"][0]["text"] == "apple="
    assert "".join(c["choices"][0]["text"] for c in chunks) == "apple=" + plain


def test_include_usage_equals_whole_usage(app):
    base = {"model": SERVED, "prompt": "pear=", "max_tokens": 5, "temperature": 0, "n": 2, "stop": "zz"}
    whole = complete(app, **{k: v for k, v in base.items() if k != "model"})
    chunks = events(post(app, "/v1/completions", {**base, "stream": True, "stream_options": {"include_usage": True}}))
    *pieces, last = chunks
    assert last["choices"] == [] and last["usage"] == whole["usage"] and last["object"] == "text_completion"
    assert all("usage" not in c for c in pieces)
    for index in (0, 1):
        text = "".join(c["choices"][0]["text"] for c in pieces if c["choices"][0]["index"] == index)
        assert text == whole["choices"][index]["text"]
    plain = events(post(app, "/v1/completions", {**base, "stream": True}))
    assert all(c["choices"] for c in plain)


@pytest.mark.parametrize("field,value", [("best_of", 2), ("best_of", 1), ("suffix", "x"), ("frobnicate", True)])
def test_unsupported_completion_fields(app, field, value):
    assert_error(post(app, "/v1/completions", {"model": SERVED, "prompt": "Hi", field: value}), 400, field,
                 "does not support")


def test_openai_client_completions_n_and_usage(app):
    async def go():
        async with openai_client(app) as client:
            whole = await client.completions.create(model=SERVED, prompt="plum=", max_tokens=4, temperature=0, n=2,
                                                    extra_body={"ignore_eos": True})
            stream = await client.completions.create(model=SERVED, prompt="plum=", max_tokens=4, temperature=0, n=2,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(go())
    assert [c.index for c in whole.choices] == [0, 1]
    assert chunks[-1].usage == whole.usage and whole.usage.completion_tokens == 8
