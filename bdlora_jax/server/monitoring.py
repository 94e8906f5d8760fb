"""GET /health (liveness) and GET /metrics (Prometheus text), open without the API key."""

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response

from .context import ServerContext, server_context

router = APIRouter()


@router.get("/health")
async def health():
    """200 while the server runs."""
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(ctx: ServerContext = Depends(server_context)):
    """Running and waiting requests, tokens, adapter loads, KV pages, preemptions and compilations, in Prometheus
    text format."""
    running, waiting = ctx.scheduler.counts()
    text = ctx.scheduler.metrics.render(ctx.engine.pool, ctx.scheduler.generator, running, waiting)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
