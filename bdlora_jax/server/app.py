"""The app factory: the FastAPI application over an engine and its scheduler, put together from the routers."""

import time
from pathlib import Path

from fastapi import FastAPI

from . import adapters, chat, completions, models, monitoring
from .body_limit import BodyLimit
from .context import ServerContext
from .draining import Drain, DrainGate
from .error_mapping import install_error_handlers
from .guard import add_guard
from .strict_json import StrictJsonBody


def create_app(engine, scheduler, served_name: str, api_key: str | None = None,
               lora_root: Path | None = None) -> FastAPI:
    """The FastAPI application serving `engine` through `scheduler`, the base model named `served_name`.

    api_key: required as 'Authorization: Bearer KEY' on /v1/* (None: open); lora_root: the only directory
    adapters may be loaded from (None: anywhere). app.state.drain starts the drain on shutdown (new requests get 503).
    """
    app = FastAPI(title="bdlora_jax", docs_url=None, redoc_url=None)
    app.state.context = ServerContext(engine, scheduler, served_name, lora_root, int(time.time()))
    app.state.drain = Drain()
    # the last added is the outermost: drain gate, guard, body limit, strict JSON, then the routes; the body limit
    # sits inside the guard, so an error raised in receive reaches the strict JSON reader (or a route) undisturbed
    app.add_middleware(StrictJsonBody)
    app.add_middleware(BodyLimit)
    add_guard(app, api_key)
    app.add_middleware(DrainGate, drain=app.state.drain)
    install_error_handlers(app)
    for module in (monitoring, models, adapters, completions, chat):
        app.include_router(module.router)
    return app
