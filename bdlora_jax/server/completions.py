"""POST /v1/completions: validate, hand the request to the scheduler thread, answer with its text or stream it (SSE)."""

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
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
from .completion_logprobs import completion_logprobs
from .context import ServerContext, server_context
from .error_mapping import error_body
from .request_bodies import CompletionBody
from .text_stream import TextStream

router = APIRouter()


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
                            stop_token_ids=tuple(body.stop_token_ids or ()), logit_bias=logit_bias(body),
                            presence_penalty=float(body.presence_penalty),
                            frequency_penalty=float(body.frequency_penalty),
                            repetition_penalty=float(body.repetition_penalty), logprobs=body.logprobs,
                            ignore_eos=body.ignore_eos, min_tokens=body.min_tokens)
    params.validate(vocab_size)
    return params


def logit_bias(body: CompletionBody) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; its JSON keys must be token ids written as integers."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
        pairs.append((token, float(bias)))
    return tuple(pairs)


def stop_strings(body: CompletionBody) -> tuple[str, ...]:
    """`stop` as a tuple, whether it came as one string or a list."""
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())


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


def completion_chunk(completion_id: str, model: str, text: str, finish: str | None,
                     logprobs: dict | None = None) -> dict:
    """A text_completion object with one choice, as a whole answer or as one event of a stream."""
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def choice_logprobs(tokenizer, request: Request, output: list[int], start: int) -> dict | None:
    """The choice's `logprobs` for output tokens start.. (None unless the request asked for them)."""
    if request.params.logprobs is None:
        return None
    return completion_logprobs(tokenizer, output, request.logprobs, start, len(output))


async def sse_events(submitted: SubmittedRequest, stream: TextStream, completion_id: str, model: str):
    """Server-sent events: each piece of text once no stop string can take it back, then [DONE] (or an error)."""
    request, reported = submitted.request, 0
    try:
        while True:
            await submitted.next_token()
            done = request.finish_reason is not None
            output = list(request.output)
            piece = stream.delta(output, final=done)
            if piece or done:
                logprobs = choice_logprobs(stream.tokenizer, request, output, reported)
                chunk = completion_chunk(completion_id, model, piece, request.finish_reason if done else None,
                                         logprobs)
                reported = len(output)
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
    output = list(request.output)
    text, _ = stream.text(output)
    answer = completion_chunk(completion_id, model, text, request.finish_reason,
                              choice_logprobs(stream.tokenizer, request, output, 0))
    prompt_tokens, completion_tokens = len(request.prompt), len(request.output)
    answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens}
    return answer


@router.post("/v1/completions")
async def completions(body: CompletionBody, ctx: ServerContext = Depends(server_context)):
    """Complete one prompt under the base model or an adapter; stream=true answers with server-sent events."""
    engine = ctx.engine
    adapter = adapter_of(ctx, body.model)
    if body.n != 1:
        raise InvalidRequestError("n", f"only n=1 is supported, got {body.n}")
    ids = prompt_ids(engine, body.prompt)
    params = sampling_params(body, engine.model_config.vocab_size)
    check_context_length(len(ids), body.max_tokens, engine.config.max_seq_len)
    submitted = SubmittedRequest(ctx.scheduler, ids, adapter, params)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    stream = TextStream(engine.tokenizer, params.stop)
    if body.stream:
        return StreamingResponse(sse_events(submitted, stream, completion_id, body.model),
                                 media_type="text/event-stream")
    return await whole_completion(submitted, stream, completion_id, body.model)
