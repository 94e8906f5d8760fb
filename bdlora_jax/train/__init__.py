"""Training many LoRA / BD-LoRA adapters at once: `python -m bdlora_jax.train --config configs/train/<x>.yaml`."""
