"""Training data: one JSONL dataset per adapter, tokenized with loss masks, split, and drawn into mixed batches.

Lines are {"prompt", "completion"} (loss on the completion and the end-of-sequence token) or {"text"} (loss
on every token). Batch t holds `per_adapter` examples of each adapter, drawn from that adapter's own
seeded permutation, so an adapter sees the same examples in the same order whether it trains alone or with
others, and a resumed run draws the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 (n,)
    loss_mask: np.ndarray  # float32 (n,): 1 where the next-token loss counts (predicting tokens[i] from < i)


def read_jsonl(path: str | Path, tokenizer, bos: int | None, eos: int | None, max_len: int) -> list[Example]:
    """Tokenize a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: dataset file not found")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
        head = [bos] if bos is not None else []
        tail = [eos] if eos is not None else []
        if isinstance(record, dict) and {"prompt", "completion"} <= set(record):
            prompt = head + tokenizer.encode(str(record["prompt"])).ids
            completion = tokenizer.encode(str(record["completion"])).ids + tail
            tokens, mask = prompt + completion, [0.0] * len(prompt) + [1.0] * len(completion)
        elif isinstance(record, dict) and "text" in record:
            tokens = head + tokenizer.encode(str(record["text"])).ids + tail
            mask = [0.0] * len(head) + [1.0] * (len(tokens) - len(head))
        else:
            raise ValueError(f"{path}:{number}: expected an object with 'prompt' and 'completion', or 'text'")
        if len(tokens) > max_len:
            raise ValueError(f"{path}:{number}: {len(tokens)} tokens exceed seq_len={max_len}")
        examples.append(Example(np.asarray(tokens, np.int32), np.asarray(mask, np.float32)))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic held-out split (at least one example each side when eval_fraction > 0)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_eval = round(eval_fraction * len(examples))
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), len(examples) - 1)
    held = [examples[i] for i in order[:n_eval]]
    return [examples[i] for i in order[n_eval:]], held


def draw(examples: list[Example], step: int, per_batch: int, seed: int) -> list[Example]:
    """The examples of one adapter for batch `step`: consecutive slices of per-epoch seeded permutations."""
    n = len(examples)
    out = []
    for position in range(step * per_batch, (step + 1) * per_batch):
        epoch, index = divmod(position, n)
        order = np.random.default_rng((seed, epoch)).permutation(n)
        out.append(examples[order[index]])
    return out


def pad_batch(rows: list[Example], seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights) (rows, seq_len): next-token targets, weights 0 on padding and on prompts."""
    inputs = np.full((len(rows), seq_len), pad, np.int32)
    targets = np.full((len(rows), seq_len), pad, np.int32)
    weights = np.zeros((len(rows), seq_len), np.float32)
    for i, row in enumerate(rows):
        n = len(row.tokens) - 1
        inputs[i, :n] = row.tokens[:-1]
        targets[i, :n] = row.tokens[1:]
        weights[i, :n] = row.loss_mask[1:]
    return inputs, targets, weights
