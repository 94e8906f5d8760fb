"""The HTTP side of `bench load`: one streamed POST /completions to an OpenAI-compatible server, timed chunk by
chunk into a RequestRecord, and the server's first model id from GET /models."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx

from .load_metrics import RequestRecord
from .load_workload import WorkItem

ERROR_TEXT_CHARS = 300  # of a failed response's body kept in its record


def completion_body(item: WorkItem, model: str, ignore_eos: bool) -> dict:
    """The streamed completion request of a work item, greedy, with a usage chunk at the end; with ignore_eos, also
    vLLM's ignore_eos and min_tokens = max_tokens, so exactly max_tokens tokens come back where the server allows."""
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body.update(ignore_eos=True, min_tokens=item.max_tokens)
    return body


def error_text(data: object) -> str:
    """The message of an OpenAI error object (or the object itself as text)."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", data["error"]))
    return str(data)[:ERROR_TEXT_CHARS]


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord) -> None:
    """POST one streamed completion and fill the record in place as chunks arrive: TTFT at the first chunk carrying
    text (or the first chunk with choices, when none carries text), inter-token gaps between text-carrying chunks,
    E2EL at [DONE], output tokens from the usage chunk (else the text-carrying chunks). Failures set record.error."""
    start = time.perf_counter()
    first_choice, token_times, chunks_with_text, usage, done = None, [], 0, None, False
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            try:
                text = error_text(json.loads(text))
            except json.JSONDecodeError:
                pass
            record.error = f"HTTP {response.status_code}: {text[:ERROR_TEXT_CHARS]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            now = time.perf_counter()
            if payload == "[DONE]":
                done = True
                break
            data = json.loads(payload)
            if "error" in data:
                record.error = f"error event: {error_text(data)}"
                return
            if data.get("choices"):
                first_choice = first_choice if first_choice is not None else now
                if data["choices"][0].get("text"):
                    token_times.append(now)
                    chunks_with_text += 1
            if data.get("usage"):
                usage = data["usage"]
    end = time.perf_counter()
    if not done:
        record.error = "the stream ended without [DONE]"
        return
    if first_choice is None:
        record.error = "the stream carried no choices"
        return
    record.ttft = (token_times[0] if token_times else first_choice) - start
    record.itl = [b - a for a, b in itertools.pairwise(token_times)]
    record.e2el = end - start
    record.output_tokens = int(usage["completion_tokens"]) if usage else chunks_with_text
    if usage and record.prompt_tokens is None:
        record.prompt_tokens = int(usage["prompt_tokens"])


async def send_request(client: httpx.AsyncClient, base_url: str, item: WorkItem, model: str, ignore_eos: bool,
                       timeout: float) -> RequestRecord:
    """One request's record: measured, or failed with its first error (a timeout after `timeout` seconds, a
    connection error, an HTTP error status or an error event), never raising."""
    record = RequestRecord(model=model, prompt_tokens=item.prompt_len)
    url = f"{base_url.rstrip('/')}/completions"
    try:
        await asyncio.wait_for(stream_completion(client, url, completion_body(item, model, ignore_eos), record),
                               timeout)
    except asyncio.TimeoutError:
        record.error = f"timed out after {timeout:g} s (--timeout)"
    except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # incl. malformed events
        record.error = f"{type(e).__name__} on POST {url}" + (f": {e}" if str(e) else "")
    if record.error is not None:
        record.ttft, record.itl, record.e2el, record.output_tokens = None, [], None, 0
    return record


def first_model(base_url: str, timeout: float) -> str:
    """The first model id the server lists at GET {base_url}/models; SystemExit naming the URL when there is none."""
    url = f"{base_url.rstrip('/')}/models"
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise SystemExit(f"--model not given and GET {url} gave no model id ({type(e).__name__}: {e}); "
                         "pass --model or --lora-modules") from None
