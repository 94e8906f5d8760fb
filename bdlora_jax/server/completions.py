"""POST /v1/completions: validate, hand the request to the scheduler thread, answer with its text or stream it (SSE)."""

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from ..engine.generator import Request
from ..engine.sampler import SamplingParams
from ..errors import (
    BdloraError,
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    MultiplePromptsError,
    RequestFailedError,
)
from .context import ServerContext, server_context
from .disconnect import cancelled_on_disconnect
from .error_mapping import error_body
from .prompt_length import refuse_overlong_text
from .request_bodies import CompletionBody
from .text_stream import TextStream

router = APIRouter()

MAX_STOP_STRINGS = 16  # stop strings a request may give (OpenAI allows 4)
MAX_STOP_CHARS = 256  # characters of each stop string


def adapter_of(ctx: ServerContext, model: str) -> str | None:
    """The adapter a request's `model` names (None for the base model); ModelNotFoundError if it names neither."""
    if model == ctx.served_name:
        return None
    if not ctx.engine.has_adapter(model):
        raise ModelNotFoundError(model)
    return model


def prompt_ids(engine, prompt: Any) -> list[int]:
    """Token ids of the one prompt of a request (text, ids, or a batch of one of either)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        raise MultiplePromptsError()
    return engine._prompt_ids(prompt)


def sampling_params(body: CompletionBody, vocab_size: int) -> SamplingParams:
    """The request's sampling parameters, validated (InvalidRequestError names a field out of range)."""
    params = SamplingParams(temperature=float(body.temperature), top_p=float(body.top_p), top_k=body.top_k,
                            seed=body.seed, max_tokens=body.max_tokens, stop=stop_strings(body),
                            stop_token_ids=tuple(body.stop_token_ids or ()))
    params.validate(vocab_size)
    return params


def stop_strings(body: CompletionBody) -> tuple[str, ...]:
    """`stop` as a tuple, whether it came as one string or a list, within MAX_STOP_STRINGS and MAX_STOP_CHARS."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    longest = max(stop, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise InvalidRequestError("stop", f"each stop string may have at most {MAX_STOP_CHARS} characters, "
                                          f"got one of {len(longest)}")
    return stop


def check_context_length(prompt_tokens: int, max_tokens: int, max_seq_len: int) -> None:
    """Refuse a prompt that cannot be completed by max_tokens within the engine's context."""
    if prompt_tokens + max_tokens > max_seq_len:
        raise ContextLengthError(prompt_tokens, max_tokens, max_seq_len,
                                 f"prompt of {prompt_tokens} tokens + max_tokens={max_tokens} exceeds the maximum "
                                 f"context length max_seq_len={max_seq_len}")


class SubmittedRequest:
    """A request handed to the scheduler thread, whose tokens arrive on an asyncio queue of this event loop."""

    def __init__(self, scheduler, ids: list[int], adapter: str | None, params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.scheduler = scheduler
        self.tokens: asyncio.Queue = asyncio.Queue()
        self.request = Request(ids, adapter, params,
                               on_token=lambda req, tok: loop.call_soon_threadsafe(self.tokens.put_nowait, tok))
        scheduler.submit(self.request)

    async def next_token(self) -> int:
        """The next token; RequestFailedError if the request ended without one (failed or aborted)."""
        token = await self.tokens.get()
        if token is None:
            raise RequestFailedError(self.request.finish_reason)
        return token

    def cancel_unless_finished(self) -> None:
        """Free the request's row and queue place when its client has gone before it finished."""
        if self.request.finish_reason is None:
            self.request.cancelled = True
            self.scheduler.wake()


def completion_chunk(completion_id: str, model: str, text: str, finish: str | None) -> dict:
    """A text_completion object with one choice, as a whole answer or as one event of a stream."""
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


async def sse_events(submitted: SubmittedRequest, stream: TextStream, completion_id: str, model: str):
    """Server-sent events: each piece of text once no stop string can take it back, then [DONE] (or an error)."""
    request = submitted.request
    try:
        while True:
            await submitted.next_token()
            done = request.finish_reason is not None
            piece = stream.delta(list(request.output), final=done)
            if piece or done:
                chunk = completion_chunk(completion_id, model, piece, request.finish_reason if done else None)
                yield f"data: {json.dumps(chunk)}\n\n"
            if done:
                break
        yield "data: [DONE]\n\n"
    except BdloraError as e:
        yield f"data: {json.dumps(error_body(e))}\n\n"
    finally:
        submitted.cancel_unless_finished()


async def whole_completion(submitted: SubmittedRequest, stream: TextStream, completion_id: str, model: str) -> dict:
    """The finished completion with its usage, once the request has ended."""
    request = submitted.request
    try:
        while request.finish_reason is None:
            await submitted.next_token()
    finally:
        submitted.cancel_unless_finished()
    text, _ = stream.text(list(request.output))
    answer = completion_chunk(completion_id, model, text, request.finish_reason)
    prompt_tokens, completion_tokens = len(request.prompt), len(request.output)
    answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens}
    return answer


@router.post("/v1/completions")
async def completions(body: CompletionBody, http: HttpRequest, ctx: ServerContext = Depends(server_context)):
    """Complete one prompt under the base model or an adapter; stream=true answers with server-sent events.

    The prompt is tokenized off the event loop (a long text is refused by its length first); a non-streaming request
    is cancelled when its client disconnects, as a stream is.
    """
    engine = ctx.engine
    adapter = adapter_of(ctx, body.model)
    if body.n != 1:
        raise InvalidRequestError("n", f"only n=1 is supported, got {body.n}")
    refuse_overlong_text(engine.tokenizer, body.prompt, engine.config.max_seq_len)
    ids = await asyncio.to_thread(prompt_ids, engine, body.prompt)
    params = sampling_params(body, engine.model_config.vocab_size)
    check_context_length(len(ids), body.max_tokens, engine.config.max_seq_len)
    submitted = SubmittedRequest(ctx.scheduler, ids, adapter, params)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    stream = TextStream(engine.tokenizer, params.stop)
    if body.stream:
        return StreamingResponse(sse_events(submitted, stream, completion_id, body.model),
                                 media_type="text/event-stream")
    async with cancelled_on_disconnect(http.receive, submitted.cancel_unless_finished):
        return await whole_completion(submitted, stream, completion_id, body.model)
