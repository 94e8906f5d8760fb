"""bdlora_jax: train and serve many LoRA / BD-LoRA adapters on one Llama across a JAX device mesh."""

__all__ = ["Engine"]


def __getattr__(name: str):
    """Import the Engine lazily so entry points can set XLA flags before jax is imported."""
    if name == "Engine":
        from .engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'bdlora_jax' has no attribute {name!r}")
