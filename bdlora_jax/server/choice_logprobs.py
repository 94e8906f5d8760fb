"""The `logprobs` objects of completion and chat choices (OpenAI's two formats), from the engine's TokenLogprob entries."""

from __future__ import annotations

from ..engine.logprobs import TokenLogprob

LOWEST_LOGPROB = -9999.0  # what a -inf log-probability is reported as (JSON has no infinity), as vLLM does


def token_text(tokenizer, token: int) -> str:
    """One token's text (its id as "token_id:N" when the model has no tokenizer)."""
    return tokenizer.decode([token]) if tokenizer is not None else f"token_id:{token}"


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def completion_logprobs(tokenizer, output: list[int], entries: list[TokenLogprob], start: int, end: int) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset} of output tokens start..end-1: each top_logprobs entry maps
    the most likely tokens' text (and the chosen token's, as OpenAI always reports it) to their log-probability;
    text_offset is where each token's text begins in the completion's text."""
    logprobs: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i in range(start, end):
        entry = entries[i]
        top = {}
        for token, logprob in entry.top:
            top.setdefault(token_text(tokenizer, token), _finite(logprob))
        top.setdefault(token_text(tokenizer, entry.token), _finite(entry.logprob))
        logprobs["tokens"].append(token_text(tokenizer, entry.token))
        logprobs["token_logprobs"].append(_finite(entry.logprob))
        logprobs["top_logprobs"].append(top)
        logprobs["text_offset"].append(len(tokenizer.decode(output[:i])) if tokenizer is not None else 0)
    return logprobs


def _chat_entry(tokenizer, token: int, logprob: float) -> dict:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", "replace"))}


def chat_logprobs(tokenizer, entries: list[TokenLogprob], start: int, end: int, top: int) -> dict:
    """{content: [{token, logprob, bytes, top_logprobs}]} of output tokens start..end-1, as a chat choice carries
    them: top_logprobs holds the `top` most likely tokens at each position, best first."""
    return {"content": [{**_chat_entry(tokenizer, entry.token, entry.logprob),
                         "top_logprobs": [_chat_entry(tokenizer, t, lp) for t, lp in entry.top[:top]]}
                        for entry in entries[start:end]]}
