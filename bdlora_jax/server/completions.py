"""POST /v1/completions: validate, hand n requests to the scheduler thread, answer with their text or stream it (SSE)."""

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from ..engine.generator import Request
from ..engine.sampler import SamplingParams
from ..errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    MultiplePromptsError,
    RequestFailedError,
)
from .choice_logprobs import completion_logprobs
from .choices import Choices, choice_params, sse_events
from .context import ServerContext, server_context
from .disconnect import cancelled_on_disconnect
from .prompt_length import refuse_overlong_text
from .request_bodies import CompletionBody, GenerationBody

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


def sampling_params(body: GenerationBody, vocab_size: int, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The request's sampling parameters with its max_tokens and number of top logprobs (None: no logprobs),
    validated (InvalidRequestError names a field out of range)."""
    params = SamplingParams(temperature=float(body.temperature), top_p=float(body.top_p), top_k=body.top_k,
                            seed=body.seed, max_tokens=max_tokens, stop=stop_strings(body),
                            stop_token_ids=tuple(body.stop_token_ids or ()), logit_bias=logit_bias(body),
                            presence_penalty=float(body.presence_penalty),
                            frequency_penalty=float(body.frequency_penalty),
                            repetition_penalty=float(body.repetition_penalty),
                            logprobs=logprobs,
                            ignore_eos=body.ignore_eos, min_tokens=body.min_tokens)
    params.validate(vocab_size)
    return params


def logit_bias(body: GenerationBody) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; its JSON keys must be token ids written as integers."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
        pairs.append((token, float(bias)))
    return tuple(pairs)


def stop_strings(body: GenerationBody) -> tuple[str, ...]:
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
        """The next token; the request's own error, or RequestFailedError, if it ended without one."""
        token = await self.tokens.get()
        if token is None:
            raise self.request.error or RequestFailedError(self.request.finish_reason)
        return token

    def cancel_unless_finished(self) -> None:
        """Free the request's row and queue place when its client has gone before it finished."""
        if self.request.finish_reason is None:
            self.scheduler.cancel(self.request)


def submit_choices(ctx: ServerContext, ids: list[int], adapter: str | None, params: SamplingParams, n: int) -> Choices:
    """Hand the request of each of n choices to the scheduler thread (see choice_params for their seeds)."""
    engine = ctx.engine
    return Choices([SubmittedRequest(ctx.scheduler, ids, adapter, p)
                    for p in choice_params(params, n, engine.model_config.vocab_size)], engine.tokenizer)


def include_usage(body: GenerationBody) -> bool:
    """Whether a stream ends with a usage chunk (stream_options.include_usage); stream_options needs stream=true."""
    if body.stream_options is None:
        return False
    if not body.stream:
        raise InvalidRequestError("stream_options", "stream_options is only allowed with stream=true")
    return body.stream_options.include_usage


def echo_text(engine, prompt: Any, ids: list[int]) -> str:
    """The prompt as text for echo: the text given, or the token ids decoded ('' without a tokenizer)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    return engine.tokenizer.decode(ids) if engine.tokenizer is not None else ""


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    """One choice of a text_completion object."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def choice_logprobs(tokenizer, request: Request, span: tuple[int, int]) -> dict | None:
    """The choice's `logprobs` for output tokens span[0]..span[1]-1 (None unless the request asked for them)."""
    if request.params.logprobs is None:
        return None
    return completion_logprobs(tokenizer, list(request.output[:span[1]]), request.logprobs, *span)


def completion_object(completion_id: str, model: str, choices: list[dict]) -> dict:
    """A text_completion object, as a whole answer or as one event of a stream."""
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}


def completion_events(choices: Choices, completion_id: str, model: str, echo: str, with_usage: bool):
    """The stream of a completion: each choice's echoed prompt first (with echo), then its pieces as they come."""
    opening = [completion_object(completion_id, model, [completion_choice(i, echo, None)])
               for i in range(len(choices.submitted)) if echo]
    tokenizer = choices.streams[0].tokenizer

    def piece_chunk(index: int, piece: str, finish: str | None, span: tuple[int, int]) -> dict:
        logprobs = choice_logprobs(tokenizer, choices.submitted[index].request, span)
        return completion_object(completion_id, model, [completion_choice(index, piece, finish, logprobs)])

    return sse_events(
        choices, opening, piece_chunk,
        (lambda counts: {**completion_object(completion_id, model, []), "usage": counts}) if with_usage else None)


async def whole_completion(choices: Choices, completion_id: str, model: str, echo: str) -> dict:
    """The finished completion, every choice with the echoed prompt before its text, and its usage."""
    finished = await choices.finished()
    tokenizer = choices.streams[0].tokenizer
    answer = completion_object(completion_id, model, [
        completion_choice(i, echo + text, finish,
                          choice_logprobs(tokenizer, s.request, (0, len(s.request.output))))
        for i, ((text, finish), s) in enumerate(zip(finished, choices.submitted))])
    answer["usage"] = choices.usage()
    return answer


@router.post("/v1/completions")
async def completions(body: CompletionBody, http: HttpRequest, ctx: ServerContext = Depends(server_context)):
    """Complete one prompt n times under the base model or an adapter; stream=true answers with server-sent events.

    The prompt is tokenized off the event loop (a long text is refused by its length first); a non-streaming request
    is cancelled when its client disconnects, as a stream is.
    """
    engine = ctx.engine
    adapter = adapter_of(ctx, body.model)
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo", "echo together with logprobs (the prompt's own logprobs) is not supported; "
                                          "ask for one or the other")
    refuse_overlong_text(engine.tokenizer, body.prompt, engine.config.max_seq_len)
    ids = await asyncio.to_thread(prompt_ids, engine, body.prompt)
    params = sampling_params(body, engine.model_config.vocab_size, body.max_tokens, body.logprobs)
    with_usage = include_usage(body)
    check_context_length(len(ids), body.max_tokens, engine.config.max_seq_len)
    choices = submit_choices(ctx, ids, adapter, params, body.n)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    echo = echo_text(engine, body.prompt, ids) if body.echo else ""
    if body.stream:
        return StreamingResponse(completion_events(choices, completion_id, body.model, echo, with_usage),
                                 media_type="text/event-stream")
    async with cancelled_on_disconnect(http.receive, choices.cancel_unfinished):
        return await whole_completion(choices, completion_id, body.model, echo)
