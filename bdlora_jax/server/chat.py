"""POST /v1/chat/completions: the messages rendered with the model's chat template, completed n times by the
machinery of /v1/completions, answered as a chat.completion or streamed as chat.completion.chunk events."""

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from ..errors import InvalidRequestError
from .chat_messages import template_messages
from .choice_logprobs import chat_logprobs
from .choices import Choices, sse_events
from .completions import adapter_of, check_context_length, include_usage, sampling_params, submit_choices
from .context import ServerContext, server_context
from .disconnect import cancelled_on_disconnect
from .prompt_length import refuse_overlong_text
from .request_bodies import ChatBody

router = APIRouter()


def chat_prompt(ctx: ServerContext, body: ChatBody) -> str:
    """The prompt text of a chat request: its messages rendered with the base model's chat template (adapters share
    it); InvalidRequestError naming the model when it has none."""
    messages = template_messages(body.messages)
    template = ctx.engine.chat_template
    if template is None:
        raise InvalidRequestError("model", f"model {body.model!r} has no chat template (no 'chat_template' in its "
                                           "tokenizer_config.json); use /v1/completions with a prompt instead")
    return template.render(messages, body.add_generation_prompt)


def chat_prompt_ids(engine, text: str) -> list[int]:
    """Token ids of a rendered prompt, without the tokenizer's own special tokens (the template placed them)."""
    if engine.tokenizer is None:
        raise InvalidRequestError("model", "this model has no tokenizer.json, which chat completions need")
    return engine._prompt_ids(engine.tokenizer.encode(text, add_special_tokens=False).ids)


def reply_max_tokens(body: ChatBody, prompt_tokens: int, max_seq_len: int) -> int:
    """max_completion_tokens, else max_tokens, else all the context the prompt leaves (at least one token)."""
    if body.max_completion_tokens is not None:
        if body.max_completion_tokens < 1:
            raise InvalidRequestError("max_completion_tokens",
                                      f"max_completion_tokens must be at least 1, got {body.max_completion_tokens}")
        return body.max_completion_tokens
    if body.max_tokens is not None:
        return body.max_tokens
    return max(max_seq_len - prompt_tokens, 1)


def top_logprobs(body: ChatBody) -> int | None:
    """How many top tokens each reported position lists (None: no logprobs); top_logprobs needs logprobs=true."""
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs", "top_logprobs needs logprobs=true")
    return (body.top_logprobs or 0) if body.logprobs else None


def choice_logprobs(choices: Choices, index: int, span: tuple[int, int]) -> dict | None:
    """A chat choice's `logprobs` for its output tokens in span (None unless the request asked for them)."""
    request = choices.submitted[index].request
    if request.params.logprobs is None:
        return None
    return chat_logprobs(choices.streams[index].tokenizer, request.logprobs, *span, request.params.logprobs)


def chat_object(chat_id: str, model: str, choices: list[dict], kind: str = "chat.completion") -> dict:
    """A chat.completion object (or, with kind='chat.completion.chunk', one event of a stream)."""
    return {"id": chat_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}


def message_choice(index: int, text: str, finish: str, logprobs: dict | None = None) -> dict:
    """One choice of a chat.completion: the assistant's message."""
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish}


def delta_chunk(chat_id: str, model: str, index: int, delta: dict, finish: str | None,
                logprobs: dict | None = None) -> dict:
    """A chat.completion.chunk carrying what one choice's message gained."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return chat_object(chat_id, model, [choice], "chat.completion.chunk")


def chat_events(choices: Choices, chat_id: str, model: str, with_usage: bool):
    """The stream of a chat completion: each choice opens with the assistant's role, then its content as it comes."""
    opening = [delta_chunk(chat_id, model, i, {"role": "assistant", "content": ""}, None)
               for i in range(len(choices.submitted))]
    return sse_events(
        choices, opening,
        lambda index, piece, finish, span: delta_chunk(chat_id, model, index, {"content": piece} if piece else {},
                                                       finish, choice_logprobs(choices, index, span)),
        (lambda counts: {**chat_object(chat_id, model, [], "chat.completion.chunk"), "usage": counts})
        if with_usage else None)


async def whole_chat(choices: Choices, chat_id: str, model: str) -> dict:
    """The finished chat completion, a message for every choice, and its usage."""
    finished = await choices.finished()
    answer = chat_object(chat_id, model, [
        message_choice(i, text, finish, choice_logprobs(choices, i, (0, len(choices.submitted[i].request.output))))
        for i, (text, finish) in enumerate(finished)])
    answer["usage"] = choices.usage()
    return answer


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, http: HttpRequest, ctx: ServerContext = Depends(server_context)):
    """Answer a conversation n times under the base model or an adapter; stream=true answers with server-sent
    events. As for completions, the prompt is tokenized off the event loop (a long one refused by its length first)
    and a non-streaming request is cancelled when its client disconnects."""
    engine = ctx.engine
    adapter = adapter_of(ctx, body.model)
    text = chat_prompt(ctx, body)
    refuse_overlong_text(engine.tokenizer, text, engine.config.max_seq_len)
    ids = await asyncio.to_thread(chat_prompt_ids, engine, text)
    max_tokens = reply_max_tokens(body, len(ids), engine.config.max_seq_len)
    params = sampling_params(body, engine.model_config.vocab_size, max_tokens, top_logprobs(body))
    with_usage = include_usage(body)
    check_context_length(len(ids), max_tokens, engine.config.max_seq_len)
    choices = submit_choices(ctx, ids, adapter, params, body.n)
    chat_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        return StreamingResponse(chat_events(choices, chat_id, body.model, with_usage), media_type="text/event-stream")
    async with cancelled_on_disconnect(http.receive, choices.cancel_unfinished):
        return await whole_chat(choices, chat_id, body.model)
