"""The n choices of one prompt: each a separate engine request, gathered whole or streamed as they come, with usage."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from ..engine.sampler import SamplingParams
from ..errors import BdloraError, InvalidRequestError
from ..text_stream import TextStream
from .error_mapping import error_body

if TYPE_CHECKING:
    from .completions import SubmittedRequest

MAX_CHOICES = 128  # OpenAI's bound on n


def choice_params(params: SamplingParams, n: int, vocab_size: int) -> list[SamplingParams]:
    """The sampling parameters of each of n choices: a seeded sampled request gets seed+i for choice i, so its
    choices differ and each is reproducible; InvalidRequestError names n (or seed) out of range."""
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError("n", f"n must be in [1, {MAX_CHOICES}], got {n}")
    if params.seed is None or params.temperature == 0:
        return [params] * n
    choices = [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]
    for choice in choices:
        choice.validate(vocab_size)
    return choices


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(data)}\n\n"


class Choices:
    """The n requests of one prompt, already handed to the scheduler thread, each with the text stream that cuts it
    at stop strings; the client's choice i is request i."""

    def __init__(self, submitted: list[SubmittedRequest], tokenizer):
        self.submitted = submitted
        self.prompt_tokens = len(submitted[0].request.prompt)
        self.streams = [TextStream(tokenizer, s.request.params.stop, s.request.params.min_tokens) for s in submitted]

    def usage(self) -> dict:
        """Usage so far: the prompt counted once, the tokens generated summed over the choices."""
        return usage(self.prompt_tokens, sum(len(s.request.output) for s in self.submitted))

    def cancel_unfinished(self) -> None:
        """Free the rows and queue places of the choices not finished (their client has gone, or one failed)."""
        for submitted in self.submitted:
            submitted.cancel_unless_finished()

    async def finished(self) -> list[tuple[str, str]]:
        """(text cut at the first stop string, finish reason) of each choice, once all have ended."""
        try:
            for submitted in self.submitted:
                while submitted.request.finish_reason is None:
                    await submitted.next_token()
        finally:
            self.cancel_unfinished()
        return [(stream.text(list(s.request.output))[0], s.request.finish_reason)
                for s, stream in zip(self.submitted, self.streams)]

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None, tuple[int, int]]]:
        """(choice index, text piece, finish reason once it has ended, the span of output tokens reported since the
        choice's previous piece) as tokens arrive, over all choices: each piece once no stop string can take it
        back; a failed choice raises its error."""
        arrived: asyncio.Queue = asyncio.Queue()

        async def follow(index: int, submitted: SubmittedRequest, stream: TextStream) -> None:
            """Put the pieces of one choice on the shared queue (or its error, which ends the stream)."""
            request, reported = submitted.request, 0
            try:
                while True:
                    await submitted.next_token()
                    done = request.finish_reason is not None
                    output = list(request.output)
                    piece = stream.delta(output, final=done)
                    if piece or done:
                        arrived.put_nowait((index, piece, request.finish_reason if done else None,
                                            (reported, len(output))))
                        reported = len(output)
                    if done:
                        return
            except BdloraError as e:
                arrived.put_nowait(e)

        tasks = [asyncio.create_task(follow(i, s, t)) for i, (s, t) in enumerate(zip(self.submitted, self.streams))]
        running = len(tasks)
        try:
            while running:
                item = await arrived.get()
                if isinstance(item, BdloraError):
                    raise item
                running -= item[2] is not None
                yield item
        finally:
            for task in tasks:
                task.cancel()
            self.cancel_unfinished()


async def sse_events(choices: Choices, opening: list[dict],
                     piece_chunk: Callable[[int, str, str | None, tuple[int, int]], dict], usage_chunk: Callable[[dict], dict] | None) -> AsyncIterator[str]:
    """Server-sent events: the opening chunks, a chunk for each piece of each choice, the usage chunk when one is
    asked for, then [DONE]; an error event ends the stream instead when a choice fails."""
    try:
        for chunk in opening:
            yield sse(chunk)
        async for index, piece, finish, span in choices.pieces():
            yield sse(piece_chunk(index, piece, finish, span))
        if usage_chunk is not None:
            yield sse(usage_chunk(choices.usage()))
        yield "data: [DONE]\n\n"
    except BdloraError as e:
        yield sse(error_body(e))
    finally:
        choices.cancel_unfinished()
