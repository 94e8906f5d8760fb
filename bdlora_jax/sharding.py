"""Logical axis names to mesh axes: one rules table per adapter strategy, plus the shape fallbacks of a model.

Every parameter, cache and key activation names its dimensions with logical axes. A strategy is only a
different table for the LoRA factor axes (and the factor shapes it implies: `bdlora` stores the column
modules' B and the row modules' A block-diagonally); the model code is the same for all three.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import STRATEGIES, ModelConfig
from .mesh import DATA, MODEL

BASE_RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "seq": None,
    "vocab": MODEL,
    "embed": None,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "head_dim": None,
    "adapter": None,
}

# LoRA factor axes. Column modules (q,k,v,gate,up): A (embed, col_lora_rank), B (lora_rank, <out>) or
# block-diagonal B (lora_block, r/N, d_out/N). Row modules (o,down): A (<in>, lora_rank) or block-diagonal
# A (lora_block, d_in/N, r/N), B (row_lora_rank, row_lora_out). k/v have their own names so that the
# kv-head fallback below can replicate them together with the kv heads.
STRATEGY_RULES: Mapping[str, Mapping[str, str | None]] = {
    "replicated": {
        "col_lora_rank": None, "kv_lora_rank": None,
        "row_lora_rank": None, "row_lora_out": None,
        "lora_block": None, "kv_lora_block": None,
    },
    "slora": {
        "col_lora_rank": MODEL, "kv_lora_rank": MODEL,
        "row_lora_rank": None, "row_lora_out": MODEL,
        "lora_block": None, "kv_lora_block": None,
    },
    "bdlora": {
        "col_lora_rank": MODEL, "kv_lora_rank": MODEL,
        "row_lora_rank": MODEL, "row_lora_out": None,
        "lora_block": MODEL, "kv_lora_block": MODEL,
    },
}

KV_AXES = ("kv_heads", "kv_lora_rank", "kv_lora_block")
# Per layer, keys are cached transposed (positions last), so a decode step's query-key products sum over a
# middle axis, which XLA vectorises along positions; values keep positions before head_dim for the same reason.
KEY_CACHE_AXES = ("batch", "kv_heads", "head_dim", None)
VALUE_CACHE_AXES = ("batch", "kv_heads", None, "head_dim")
# A paged cache's key and value pages (num_pages, kv_heads, page_size, head_dim): one pool, split by kv heads only
PAGE_AXES = (None, "kv_heads", None, "head_dim")

# The base axis of each adapted module's sharded side: column modules' output, row modules' input.
COLUMN_OUT = {"q_proj": "q_heads", "k_proj": "kv_heads", "v_proj": "kv_heads", "gate_proj": "mlp", "up_proj": "mlp"}
ROW_IN = {"o_proj": "q_heads", "down_proj": "mlp"}


def weight_axes(module: str) -> tuple[str, str]:
    """Logical axes of a base weight in (d_in, d_out) orientation."""
    if module in COLUMN_OUT:
        return ("embed", COLUMN_OUT[module])
    return (ROW_IN[module], "embed")


def factor_axes(module: str, block_factors: bool) -> tuple[tuple, tuple]:
    """Logical axes of a module's (A, B) bank factors; block_factors selects bdlora's block-diagonal form."""
    if module in COLUMN_OUT:
        out = COLUMN_OUT[module]
        kv = out == "kv_heads"
        a = ("adapter", "embed", "kv_lora_rank" if kv else "col_lora_rank")
        if block_factors:
            return a, ("adapter", "kv_lora_block" if kv else "lora_block", None, None)
        return a, ("adapter", None, out)
    a = ("adapter", "lora_block", None, None) if block_factors else ("adapter", ROW_IN[module], None)
    return a, ("adapter", "row_lora_rank", "row_lora_out")


def sigma_axes(module: str, block_factors: bool) -> tuple:
    """Logical axes of a module's Σ: blocked like the module's block-diagonal factor under bdlora."""
    if not block_factors:
        return ("adapter", None, None, None)
    kv = module in ("k_proj", "v_proj")
    return ("adapter", "kv_lora_block" if kv else "lora_block", None, None)


def compressed_axes(module: str, block_factors: bool) -> tuple[tuple, tuple, tuple]:
    """Logical axes of a module's compressed (V, U, Σ): V like the bank's A, U like its B."""
    a_axes, b_axes = factor_axes(module, block_factors)
    return a_axes, b_axes, sigma_axes(module, block_factors)


@dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus the resolved logical-axis rules of one strategy for one model."""

    mesh: Mesh
    strategy: str
    rules: tuple[tuple[str, str | None], ...]
    kv_replicated: bool = False

    @property
    def model_size(self) -> int:
        return self.mesh.shape[MODEL]

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def block_factors(self) -> bool:
        """Whether this strategy stores one factor per module block-diagonally (column B, row A)."""
        return self.strategy == "bdlora"

    def spec(self, logical_axes: tuple[str | None, ...]) -> PartitionSpec:
        """PartitionSpec of an array whose dims carry these logical names (None = replicated dim)."""
        rules = dict(self.rules)
        mesh_axes = []
        for name in logical_axes:
            if name is not None and name not in rules:
                raise KeyError(f"logical axis {name!r} has no rule in the {self.strategy!r} table")
            mesh_axes.append(None if name is None else rules[name])
        return PartitionSpec(*mesh_axes)

    def sharding(self, logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))


def make_plan(mesh: Mesh, strategy: str, config: ModelConfig, max_lora_rank: int | None = None) -> ShardingPlan:
    """Resolve the strategy's rules for a model on a mesh, applying the documented fallbacks.

    Fallbacks: kv heads (and the k/v adapter factors) are replicated when the model-axis size does not divide
    the kv-head count, as vLLM does; the vocabulary is replicated when the model axis does not divide it.
    Query heads, the MLP width and the adapter rank must divide, or a ValueError names the value.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    n = mesh.shape[MODEL]
    rules = {**BASE_RULES, **STRATEGY_RULES[strategy]}
    if config.num_heads % n:
        raise ValueError(f"num_heads={config.num_heads} is not divisible by the model-axis size {n}")
    if config.intermediate_size % n:
        raise ValueError(f"intermediate_size={config.intermediate_size} is not divisible by the model-axis size {n}")
    kv_replicated = config.num_kv_heads % n != 0
    if kv_replicated:
        rules.update({name: None for name in KV_AXES})
    if config.vocab_size % n:
        rules["vocab"] = None
    if max_lora_rank is not None and strategy != "replicated" and max_lora_rank % n:
        raise ValueError(
            f"max_lora_rank={max_lora_rank} must be divisible by the model-axis size {n} under strategy {strategy!r}"
        )
    if strategy == "slora" and config.hidden_size % n:
        raise ValueError(f"hidden_size={config.hidden_size} is not divisible by the model-axis size {n}")
    return ShardingPlan(mesh=mesh, strategy=strategy, rules=tuple(rules.items()), kv_replicated=kv_replicated)
