"""How many KV pages a memory budget holds: the bytes one page takes on a device, and a device's free memory."""

from __future__ import annotations

import jax
import numpy as np

from ..config import ModelConfig
from ..sharding import ShardingPlan


def page_bytes_per_device(config: ModelConfig, plan: ShardingPlan, page_size: int, dtype) -> int:
    """Bytes one page takes on each device: keys and values of every layer, for the kv heads the device holds."""
    kv_heads = config.num_kv_heads if plan.kv_replicated else config.num_kv_heads // plan.model_size
    return 2 * config.num_layers * kv_heads * page_size * config.head_dim * np.dtype(dtype).itemsize


def free_device_memory(device: jax.Device) -> int:
    """Bytes a device has free (its limit less what is in use); ValueError where the backend does not say (CPU)."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"kv_cache_memory as a fraction needs the free memory of device {device}, which its "
                         f"backend does not report; give the bytes instead")
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def pages_for_memory(memory: float, config: ModelConfig, plan: ShardingPlan, page_size: int, dtype) -> int:
    """Pages that fit `memory`: bytes of each device (>= 1), or a fraction (< 1) of the first device's free memory."""
    budget = memory * free_device_memory(plan.mesh.devices.flat[0]) if memory < 1 else memory
    return int(budget // page_bytes_per_device(config, plan, page_size, dtype))
