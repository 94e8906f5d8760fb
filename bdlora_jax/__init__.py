"""bdlora_jax: train and serve many LoRA / BD-LoRA adapters on one Llama across a JAX device mesh."""

from .engine.engine import Engine

__all__ = ["Engine"]
