"""The workload of `bench load`: its prompts (random token ids or a JSONL dataset), when each request is sent
(Poisson or gamma arrivals, as `vllm bench serve` draws them) and which adapter each request names."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSIGNMENTS = ("random", "round-robin", "zipf")


@dataclass(frozen=True)
class WorkItem:
    """One request to send: its prompt (text or token ids), max_tokens, and the model it names (None: the
    run's adapter assignment or default model decides)."""

    prompt: str | list[int]
    max_tokens: int
    model: str | None = None

    @property
    def prompt_len(self) -> int | None:
        """The prompt's length in tokens when it is given as token ids (a text's is known only to the server)."""
        return len(self.prompt) if isinstance(self.prompt, list) else None


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds from the start at which each of n requests is sent: all at 0 with an infinite rate, else the first at
    0 and then gamma-distributed gaps of shape `burstiness` and mean 1/rate (burstiness 1: a Poisson process)."""
    if rate <= 0 or math.isnan(rate):
        raise ValueError(f"--request-rate must be > 0 (or inf), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]


def sample_lengths(n: int, length: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """n integer lengths uniform in [length·(1-r), length·(1+r)] (at least 1 each)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def random_workload(n: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    rng: np.random.Generator, output_range_ratio: float | None = None) -> list[WorkItem]:
    """n prompts of random token ids in [0, vocab_size), their lengths and max_tokens drawn by sample_lengths
    (max_tokens within output_range_ratio, by default range_ratio as well)."""
    if vocab_size < 1:
        raise ValueError(f"--vocab-size must be >= 1, got {vocab_size}")
    inputs = sample_lengths(n, input_len, range_ratio, rng)
    outputs = sample_lengths(n, output_len, range_ratio if output_range_ratio is None else output_range_ratio, rng)
    return [WorkItem([int(t) for t in rng.integers(0, vocab_size, size=int(i))], int(o))
            for i, o in zip(inputs, outputs)]


def read_dataset(path: Path, default_max_tokens: int) -> list[WorkItem]:
    """The requests of a JSONL file: one object per line with "prompt" (text or a list of token ids) and optional
    "max_tokens" (default: default_max_tokens) and "model"; blank lines are skipped. A bad line raises ValueError
    naming path:line and the field."""
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get("prompt")
        is_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not is_ids:
            raise ValueError(f"{where}: field 'prompt' must be a non-empty string or list of token ids, got {prompt!r}")
        max_tokens = record.get("max_tokens", default_max_tokens)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"{where}: field 'max_tokens' must be an integer >= 1, got {max_tokens!r}")
        model = record.get("model")
        if model is not None and not (isinstance(model, str) and model):
            raise ValueError(f"{where}: field 'model' must be a non-empty string, got {model!r}")
        items.append(WorkItem(prompt, max_tokens, model))
    if not items:
        raise ValueError(f"{path}: no requests (expected one JSON object per line)")
    return items


def assign_adapters(names: list[str], n: int, how: str, rng: np.random.Generator, zipf_alpha: float = 1.0) -> list[str]:
    """The adapter of each of n requests: round-robin over names, uniformly random, or Zipf-distributed by rank
    (P(names[k]) ∝ 1/(k+1)^alpha: the first name is the most popular)."""
    if not names:
        raise ValueError("--lora-modules: expected at least one adapter name")
    if how == "round-robin":
        return [names[i % len(names)] for i in range(n)]
    if how == "random":
        return [names[int(k)] for k in rng.integers(0, len(names), size=n)]
    if how == "zipf":
        if zipf_alpha < 0:
            raise ValueError(f"--zipf-alpha must be >= 0, got {zipf_alpha}")
        weights = 1.0 / np.arange(1, len(names) + 1) ** zipf_alpha
        return [names[int(k)] for k in rng.choice(len(names), size=n, p=weights / weights.sum())]
    raise ValueError(f"--lora-assignment must be one of {', '.join(ASSIGNMENTS)}, got {how!r}")
