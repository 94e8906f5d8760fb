"""Test access to the package's random adapters."""

from bdlora_jax.lora.synthetic import random_adapter  # noqa: F401
