"""Inference engine: adapter pool, KV cache handling and the Engine API."""
