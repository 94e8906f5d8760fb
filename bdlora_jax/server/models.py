"""GET /v1/models: the base model and every adapter served, each adapter a child of the base model."""

from fastapi import APIRouter, Depends

from .context import ServerContext, server_context

router = APIRouter()


def model_card(ctx: ServerContext, name: str, parent: str | None) -> dict:
    """One entry of the list, as OpenAI and vLLM show it."""
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "bdlora_jax", "root": name,
            "parent": parent}


@router.get("/v1/models")
async def models(ctx: ServerContext = Depends(server_context)):
    """The served base model first, then the adapters by name."""
    cards = [model_card(ctx, ctx.served_name, None)]
    cards += [model_card(ctx, name, ctx.served_name) for name in ctx.engine.adapters]
    return {"object": "list", "data": cards}
