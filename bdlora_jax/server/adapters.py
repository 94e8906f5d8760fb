"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's API): adapters change between generation steps."""

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from ..adapters.peft_io import read_adapter
from ..errors import AdapterConflictError, ForbiddenPathError
from .context import ServerContext, server_context
from .request_bodies import LoadBody, UnloadBody

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_adapter(body: LoadBody, ctx: ServerContext = Depends(server_context)):
    """Read and validate a PEFT adapter directory off the event loop, then register it in the scheduler thread.

    Under --lora-root, the directory and every file read in it must lie under the root once symlinks are resolved.
    """
    path = Path(body.lora_path)
    if ctx.lora_root is not None and not path.resolve().is_relative_to(ctx.lora_root.resolve()):
        raise ForbiddenPathError(body.lora_path, ctx.lora_root)
    if body.lora_name == ctx.served_name or ctx.engine.has_adapter(body.lora_name):
        raise AdapterConflictError(body.lora_name, f"adapter name {body.lora_name!r} is already in use")
    adapter = await asyncio.to_thread(read_adapter, path, ctx.engine.model_config, body.lora_name, ctx.lora_root)
    await asyncio.wrap_future(ctx.scheduler.add_adapter(body.lora_name, adapter, source=path))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(body: UnloadBody, ctx: ServerContext = Depends(server_context)):
    """Unregister an adapter in the scheduler thread; refused while running or waiting requests use it."""
    await asyncio.wrap_future(ctx.scheduler.remove_adapter(body.lora_name))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
