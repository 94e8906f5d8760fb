"""GET /health (liveness) and GET /metrics (Prometheus text), open without the API key."""

import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .context import ServerContext, server_context

router = APIRouter()


@router.get("/health")
async def health(ctx: ServerContext = Depends(server_context)):
    """200 while the server runs; a multi-process server lists its followers: each one's compilations since
    warm-up and seconds since it last answered. 503 once a follower is lost."""
    replicas = ctx.scheduler.replicas
    if replicas is None:
        return Response(status_code=200)
    now = time.monotonic()
    followers = [{"process_id": f.process_id, "compilations_after_warmup": f.compilations_after_warmup,
                  "seconds_since_answer": round(now - f.last_seen, 3)} for f in replicas.followers.values()]
    lost = ctx.scheduler.peer_lost
    return JSONResponse({"status": "ok" if lost is None else f"lost: {lost}", "followers": followers},
                        status_code=200 if lost is None else 503)


@router.get("/metrics")
async def metrics(ctx: ServerContext = Depends(server_context)):
    """Running and waiting requests, tokens, adapter loads, KV pages, preemptions and compilations, in Prometheus
    text format."""
    running, waiting = ctx.scheduler.counts()
    text = ctx.scheduler.metrics.render(ctx.engine.pool, ctx.scheduler.generator, running, waiting)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
