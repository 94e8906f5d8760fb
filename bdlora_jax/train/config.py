"""The fields of a training run (no jax import here, so entry points can set XLA flags first)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import LORA_MODULES


@dataclass(frozen=True)
class TrainConfig:
    """Every field of a training run; YAML files and command-line key=value overrides fill it."""

    model: str = "demo"
    adapters: dict[str, str] = field(default_factory=dict)
    kind: str = "lora"
    nblocks: int = 8
    target_modules: tuple[str, ...] = LORA_MODULES
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    mesh: str = "1x1"
    strategy: str = "replicated"
    batch_size: int = 16
    seq_len: int = 64
    steps: int = 100
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2
    seed: int = 0
    out_dir: str = "runs/train"
    dtype: str = "float32"
    packing: bool = False
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "bdlora"):
            raise ValueError(f"kind={self.kind!r}: expected 'lora' or 'bdlora'")
        unknown = [m for m in self.target_modules if m not in LORA_MODULES]
        if unknown:
            raise ValueError(f"target_modules: unknown module(s) {unknown}; expected some of {list(LORA_MODULES)}")
        if not self.adapters:
            raise ValueError("adapters: expected at least one NAME: path/to/data.jsonl")
        if self.batch_size % len(self.adapters):
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of the {len(self.adapters)} adapters")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a probability in [0, 1)")
        for name in ("steps", "batch_size", "seq_len", "rank", "save_every", "eval_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens={self.loss_chunk_tokens}: expected 0 (off) or a token count")
