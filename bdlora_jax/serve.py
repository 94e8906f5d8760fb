"""`python -m bdlora_jax.serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the multi-adapter engine.

Handlers validate, enqueue a request for the scheduler thread and await its tokens; the scheduler thread
is the only code that touches the device. `model` in a request names the base model or an adapter, as
in vLLM. Bad input gets a 4xx with an OpenAI error body and never disturbs other requests.
"""

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi import Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import DTYPES, STRATEGIES
from .mesh import emulate_host_devices

log = logging.getLogger("bdlora_jax.serve")
MAX_BODY_BYTES = 4 * 1024 * 1024


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _error_body(status: int, message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


class BodyTooLarge(HTTPException):
    """Raised while a body streams in past MAX_BODY_BYTES; an HTTPException, so FastAPI's body parsing lets it through."""

    def __init__(self):
        super().__init__(413, f"request body exceeds {MAX_BODY_BYTES} bytes")


class BodyLimit:
    """ASGI middleware counting the bytes of a request body as they arrive, so a body sent without Content-Length
    (chunked) is refused with 413 too, before it is all in memory."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


class TextStream:
    """Incremental detokenization that never emits text a stop string could still take back."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.sent = tokenizer, stop, 0
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def text(self, tokens: list[int]) -> tuple[str, bool]:
        """(text so far cut at the first stop string, whether a stop string was found)."""
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        cuts = [text.find(s) for s in self.stop if s in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def delta(self, tokens: list[int], final: bool) -> str:
        text, stopped = self.text(tokens)
        ready = len(text) if (final or stopped) else len(text) - self.holdback
        while ready > self.sent and text[ready - 1] == "\ufffd" and not final:
            ready -= 1
        piece = text[self.sent:max(ready, self.sent)]
        self.sent += len(piece)
        return piece


class CompletionBody(BaseModel):
    """POST /v1/completions, as OpenAI and vLLM accept it (top_k, seed and stop_token_ids are vLLM's)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt = 16
    temperature: StrictFloat | StrictInt = 1.0
    top_p: StrictFloat | StrictInt = 1.0
    top_k: StrictInt = 0
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    stream: StrictBool = False
    n: StrictInt = 1

class LoadBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str
    lora_path: str

class UnloadBody(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str


def create_app(engine, scheduler, served_name: str, api_key: str | None = None, lora_root: Path | None = None):
    """The FastAPI application serving `engine` through `scheduler`."""
    from .engine.generator import Request
    from .engine.sampler import SamplingParams
    from .lora.peft_io import AdapterError, read_adapter

    app = FastAPI(title="bdlora_jax", docs_url=None, redoc_url=None)
    created = int(time.time())
    # added before `guard`, so it sits inside it: an error raised in receive then reaches the route undisturbed
    app.add_middleware(BodyLimit)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(_error_body(exc.status, exc.message, exc.type, exc.code), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        return JSONResponse(_error_body(exc.status_code, str(exc.detail), "invalid_request_error",
                                        codes.get(exc.status_code)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = f"invalid field '{where}': {first.get('msg')}" if first.get("type") != "json_invalid" \
            else f"malformed JSON body: {first.get('msg')}"
        return JSONResponse(_error_body(400, message, "invalid_request_error", None), status_code=400)

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None and int(length) > MAX_BODY_BYTES:
            return JSONResponse(_error_body(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}",
                                            "invalid_request_error", "body_too_large"), status_code=413)
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return JSONResponse(_error_body(401, "missing or invalid API key (Authorization: Bearer ...)",
                                                "authentication_error", "invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        running, waiting = scheduler.counts()
        text = scheduler.metrics.render(engine.pool, running, waiting)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        cards = [{"id": served_name, "object": "model", "created": created, "owned_by": "bdlora_jax",
                  "root": served_name, "parent": None}]
        cards += [{"id": name, "object": "model", "created": created, "owned_by": "bdlora_jax",
                   "root": name, "parent": served_name} for name in engine.adapters]
        return {"object": "list", "data": cards}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadBody):
        path = Path(body.lora_path)
        if lora_root is not None and not path.resolve().is_relative_to(lora_root.resolve()):
            raise APIError(403, f"lora_path {body.lora_path!r} is outside the allowed --lora-root {str(lora_root)!r}",
                           "permission_error", "forbidden_path")
        if body.lora_name == served_name or engine.has_adapter(body.lora_name):
            raise APIError(400, f"adapter name {body.lora_name!r} is already in use", code="name_taken")
        try:
            adapter = await asyncio.to_thread(read_adapter, path, engine.model_config, body.lora_name)
            await asyncio.wrap_future(scheduler.call(lambda: engine.add_adapter(body.lora_name, adapter)))
        except (AdapterError, ValueError) as e:
            raise APIError(400, str(e), code="invalid_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadBody):
        def unload():
            if not engine.has_adapter(body.lora_name):
                raise APIError(404, f"adapter {body.lora_name!r} is not loaded", "not_found_error", "adapter_not_found")
            if engine.compressed is not None and body.lora_name in engine.compressed:
                raise APIError(400, f"adapter {body.lora_name!r} belongs to the compressed bank "
                                    f"{engine.compressed.where} and cannot be unloaded", code="compressed_adapter")
            if body.lora_name in scheduler.generator.adapters_in_use() or any(
                r.adapter == body.lora_name for r in scheduler.generator.waiting
            ):
                raise APIError(409, f"adapter {body.lora_name!r} is used by running or waiting requests; "
                                    "unload it when they have finished", "conflict_error", "adapter_in_use")
            engine.remove_adapter(body.lora_name)

        await asyncio.wrap_future(scheduler.call(unload))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def prompt_ids(prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            raise APIError(400, "only one prompt per request is supported", code="multiple_prompts")
        try:
            return engine._prompt_ids(prompt)
        except ValueError as e:
            raise APIError(400, f"invalid field 'prompt': {e}") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if body.model != served_name and not engine.has_adapter(body.model):
            raise APIError(404, f"model {body.model!r} does not exist; see /v1/models", "not_found_error",
                           "model_not_found")
        if body.n != 1:
            raise APIError(400, f"invalid field 'n': only n=1 is supported, got {body.n}")
        ids = prompt_ids(body.prompt)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(temperature=float(body.temperature), top_p=float(body.top_p), top_k=body.top_k,
                                seed=body.seed, max_tokens=body.max_tokens, stop=stop,
                                stop_token_ids=tuple(body.stop_token_ids or ()))
        try:
            params.validate(engine.model_config.vocab_size)
        except ValueError as e:
            raise APIError(400, f"invalid field {str(e).split()[0]!r}: {e}") from None
        if len(ids) + body.max_tokens > engine.config.max_seq_len:
            raise APIError(400, f"prompt of {len(ids)} tokens + max_tokens={body.max_tokens} exceeds the "
                                f"maximum context length max_seq_len={engine.config.max_seq_len}",
                           code="context_length_exceeded")
        adapter = None if body.model == served_name else body.model
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = Request(ids, adapter, params,
                          on_token=lambda req, tok: loop.call_soon_threadsafe(events.put_nowait, tok))
        scheduler.submit(request)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        stream = TextStream(engine.tokenizer, stop)

        def choice(text: str, finish: str | None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": int(time.time()),
                    "model": body.model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                      "finish_reason": finish}]}

        async def next_event():
            token = await events.get()
            if token is None:
                raise APIError(500, f"request ended: {request.finish_reason}", "server_error", request.finish_reason)
            return token

        if body.stream:
            async def sse():
                try:
                    while True:
                        await next_event()
                        done = request.finish_reason is not None
                        piece = stream.delta(list(request.output), final=done)
                        if piece or done:
                            yield f"data: {json.dumps(choice(piece, request.finish_reason if done else None))}\n\n"
                        if done:
                            break
                    yield "data: [DONE]\n\n"
                except APIError as e:
                    yield f"data: {json.dumps(_error_body(e.status, e.message, e.type, e.code))}\n\n"
                finally:
                    if request.finish_reason is None:
                        request.cancelled = True
                        scheduler.wake()

            return StreamingResponse(sse(), media_type="text/event-stream")

        try:
            while request.finish_reason is None:
                await next_event()
        finally:
            if request.finish_reason is None:
                request.cancelled = True
                scheduler.wake()
        text, _ = stream.text(list(request.output))
        body_out = choice(text, request.finish_reason)
        body_out["usage"] = {"prompt_tokens": len(ids), "completion_tokens": len(request.output),
                             "total_tokens": len(ids) + len(request.output)}
        return body_out

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bdlora_jax.serve", description=__doc__)
    p.add_argument("--model", default="demo", help="Hugging Face Llama directory, or 'demo' (the default)")
    p.add_argument("--served-model-name", default=None, help="name of the base model in requests (default: its dir)")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH", help="adapters to register at start")
    p.add_argument("--lora-root", type=Path, default=None, help="only load adapters from under this directory")
    p.add_argument("--compressed-bank", type=Path, default=None, metavar="DIR",
                   help="a compressed-bank directory (python -m bdlora_jax.compress) whose adapters are served by name")
    p.add_argument("--mesh", default="1x1", help="DxM device mesh, e.g. 1x8 (emulated on a CPU-only host)")
    p.add_argument("--strategy", default="bdlora", choices=STRATEGIES)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emulate_host_devices(args.mesh)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import uvicorn

    from .demo import demo_adapters
    from .engine.engine import Engine
    from .engine.scheduler import Scheduler

    modules = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora-modules {item!r}: expected NAME=PATH")
        modules[name] = Path(path)
    engine = Engine.from_pretrained(args.model, mesh=args.mesh, strategy=args.strategy, max_loras=args.max_loras,
                                    max_lora_rank=args.max_lora_rank, max_batch=args.max_batch,
                                    max_seq_len=args.max_seq_len, dtype=args.dtype,
                                    compressed_bank=args.compressed_bank)
    if args.model == "demo":  # the shipped task adapters, unless a compressed bank already serves their names
        shipped = {name: path for name, path in demo_adapters().items() if not engine.has_adapter(name)}
        if len(shipped) < len(demo_adapters()):
            log.info("demo adapters %s are served from the compressed bank", sorted(set(demo_adapters()) - set(shipped)))
        modules = {**shipped, **modules}
    for name, path in modules.items():
        engine.add_adapter(name, path)
    served = args.served_model_name or ("demo" if args.model == "demo" else Path(args.model).resolve().name)
    scheduler = Scheduler(engine)
    log.info("warming up (compiling prefill buckets, decode step and slot writes) ...")
    scheduler.warm_up()
    scheduler.start()
    log.info("serving %s with %d adapters on mesh %s (%s) at http://%s:%d", served, len(engine.adapters), args.mesh,
             args.strategy, args.host, args.port)
    app = create_app(engine, scheduler, served, api_key=args.api_key, lora_root=args.lora_root)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
