"""Multi-adapter LoRA shrink/expand: Pallas Triton GPU kernels and the pure-jnp reference they are tested against."""

from .lora_triton import (
    TileConfig,
    bgmv_expand,
    bgmv_shrink,
    group_by_slot,
    heuristic_config,
    prefill_block_m,
    sgmv_expand,
    sgmv_expand_items,
    sgmv_shrink,
    sgmv_shrink_items,
    work_items,
)

__all__ = ["TileConfig", "bgmv_expand", "bgmv_shrink", "group_by_slot", "heuristic_config", "prefill_block_m",
           "sgmv_expand", "sgmv_expand_items", "sgmv_shrink", "sgmv_shrink_items", "work_items"]
