"""Frozen configuration dataclasses: the Llama architecture, the engine's limits, and YAML loading for entry points."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

STRATEGIES = ("replicated", "slora", "bdlora")
LORA_IMPLS = ("xla", "pallas", "auto")
DTYPES = ("float32", "bfloat16")

COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_MODULES = ("o_proj", "down_proj")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 ("llama3") RoPE frequency scaling parameters."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama decoder (the fields of a Hugging Face LlamaConfig that matter)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of an adapted linear module, in y = x @ W orientation."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]


KV_CACHES = ("contiguous", "paged")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and layout of one serving/inference engine."""

    mesh: str = "1x1"
    strategy: str = "bdlora"
    max_loras: int = 8
    max_lora_rank: int = 16
    max_batch: int = 16
    max_seq_len: int = 512
    dtype: str = "float32"
    lora_impl: str = "auto"
    kv_cache: str = "contiguous"  # "paged": a pool of pages and ragged steps mixing prompt chunks with decode tokens
    page_size: int = 16  # tokens per page (kv_cache "paged")
    num_pages: int | None = None  # pages per layer; None: from kv_cache_memory, else max_batch x max_seq_len tokens
    kv_cache_memory: float | None = None  # bytes of each device for the pages, or a fraction (< 1) of its free memory
    max_num_batched_tokens: int = 256  # tokens of one ragged step (kv_cache "paged")

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache={self.kv_cache!r}: expected one of {KV_CACHES}")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 1):
            raise ValueError(f"num_pages={self.num_pages!r}: expected a positive integer or None")
        if self.num_pages is not None and self.kv_cache_memory is not None:
            raise ValueError("num_pages and kv_cache_memory both set: expected one way of sizing the page pool")
        if self.kv_cache_memory is not None and not self.kv_cache_memory > 0:
            raise ValueError(f"kv_cache_memory={self.kv_cache_memory!r}: expected bytes (>= 1) or a fraction in (0, 1)")
        if self.num_pages is not None and self.num_pages * self.page_size < self.max_seq_len:
            raise ValueError(f"num_pages={self.num_pages}: {self.num_pages} pages of {self.page_size} tokens cannot "
                             f"hold one request of max_seq_len={self.max_seq_len} tokens; expected at least "
                             f"{-(-self.max_seq_len // self.page_size)} pages")
        if self.kv_cache == "paged" and self.max_num_batched_tokens < self.max_batch:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens}: expected at least max_batch="
                             f"{self.max_batch}, so that every running request can decode in one step")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.lora_impl not in LORA_IMPLS:
            raise ValueError(f"lora_impl={self.lora_impl!r}: expected one of {LORA_IMPLS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        for field in ("max_loras", "max_lora_rank", "max_batch", "max_seq_len", "page_size", "max_num_batched_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r}: expected a positive integer")


def model_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
    """Build a ModelConfig from our YAML keys or a Hugging Face config.json dict (both rope forms)."""
    if "hidden_size" not in data:
        raise ValueError(f"{source}: missing field 'hidden_size'; not a Llama config")
    try:
        num_heads = int(data["num_attention_heads"] if "num_attention_heads" in data else data["num_heads"])
        num_kv_heads = int(data.get("num_key_value_heads", data.get("num_kv_heads", num_heads)))
        hidden = int(data["hidden_size"])
        rope = data.get("rope_parameters") or {}
        theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
        scaling_dict = data.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        eos = data.get("eos_token_id", data.get("eos_token_ids"))
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return ModelConfig(
            vocab_size=int(data["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_layers=int(data["num_hidden_layers"] if "num_hidden_layers" in data else data["num_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(data.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(scaling_dict, source),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            max_position_embeddings=int(data.get("max_position_embeddings", 131072)),
            bos_token_id=data.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=str(data.get("name", data.get("_name_or_path", "llama")) or "llama"),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from None


def _rope_scaling(data: dict[str, Any] | None, source: str) -> RopeScaling | None:
    """Parse a rope_scaling / rope_parameters block; only 'llama3' scaling (or none) is supported."""
    if not data:
        return None
    kind = data.get("rope_type", data.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"{source}: rope_type={kind!r} is not supported; expected 'llama3' or 'default'")
    return RopeScaling(
        factor=float(data["factor"]),
        low_freq_factor=float(data["low_freq_factor"]),
        high_freq_factor=float(data["high_freq_factor"]),
        original_max_position_embeddings=int(data["original_max_position_embeddings"]),
    )


def load_model_config_yaml(path: str | Path) -> ModelConfig:
    """Read a configs/models/*.yaml file (our keys or HF keys) into a ModelConfig."""
    import yaml

    path = Path(path)
    with path.open() as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of model fields")
    data.setdefault("name", path.stem)
    return model_config_from_dict(data, str(path))
