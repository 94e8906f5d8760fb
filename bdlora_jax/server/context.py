"""What every route needs (engine, scheduler, served model name, settings), kept on the app and handed to routes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..engine.scheduler import Scheduler


@dataclass(frozen=True)
class ServerContext:
    """The engine, the scheduler that owns its device, and the server's settings.

    served_name: the base model's name in requests; lora_root: the only directory adapters may be loaded from
    (None: anywhere); created: the server's start time, shown in /v1/models.
    """

    engine: Engine
    scheduler: Scheduler
    served_name: str
    lora_root: Path | None
    created: int


def server_context(request: Request) -> ServerContext:
    """FastAPI dependency: the context of the app that received this request."""
    return request.app.state.context
