"""The app factory: the FastAPI application over an engine and its scheduler, put together from the routers."""

import time
from pathlib import Path

from fastapi import FastAPI

from . import adapters, chat, completions, models, monitoring
from .body_limit import BodyLimit
from .context import ServerContext
from .error_mapping import install_error_handlers
from .guard import add_guard


def create_app(engine, scheduler, served_name: str, api_key: str | None = None,
               lora_root: Path | None = None) -> FastAPI:
    """The FastAPI application serving `engine` through `scheduler`, the base model named `served_name`.

    api_key: required as 'Authorization: Bearer KEY' on /v1/* (None: open); lora_root: the only directory
    adapters may be loaded from (None: anywhere).
    """
    app = FastAPI(title="bdlora_jax", docs_url=None, redoc_url=None)
    app.state.context = ServerContext(engine, scheduler, served_name, lora_root, int(time.time()))
    # added before the guard, so it sits inside it: an error raised in receive then reaches the route undisturbed
    app.add_middleware(BodyLimit)
    add_guard(app, api_key)
    install_error_handlers(app)
    for module in (monitoring, models, adapters, completions, chat):
        app.include_router(module.router)
    return app
