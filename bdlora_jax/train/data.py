"""Training data: one JSONL dataset per adapter, tokenized with loss masks, split, and drawn into mixed batches.

Lines are {"prompt", "completion"} (loss on the completion and the end-of-sequence token), {"text"} (loss
on every token), or already tokenized: {"input_ids"} (loss on every token) or {"input_ids", "labels"} (labels
as in Hugging Face: the token itself where the loss counts, -100 where it does not; nothing is added around
them), which needs no tokenizer. Batch t holds `per_adapter` examples of each adapter, drawn from that adapter's own
seeded permutation, so an adapter sees the same examples in the same order whether it trains alone or with
others, and a resumed run draws the batches an uninterrupted one would.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 (n,)
    loss_mask: np.ndarray  # float32 (n,): 1 where the next-token loss counts (predicting tokens[i] from < i)


IGNORE_LABEL = -100


def token_ids(path: Path, number: int, record: dict, vocab_size: int | None) -> tuple[list[int], list[float]]:
    """(tokens, loss mask) of an already tokenized row; errors name the file, line and field."""
    ids = record["input_ids"]
    if not isinstance(ids, list) or len(ids) < 2 or not all(type(t) is int for t in ids):
        raise ValueError(f"{path}:{number}: field 'input_ids': expected a list of at least 2 integer token ids")
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"{path}:{number}: field 'input_ids': token id {bad[0]} outside the vocabulary "
                         f"[0, {vocab_size})")
    if "labels" not in record:
        return ids, [1.0] * len(ids)
    labels = record["labels"]
    if not isinstance(labels, list) or len(labels) != len(ids) or not all(type(t) is int for t in labels):
        raise ValueError(f"{path}:{number}: field 'labels': expected a list of {len(ids)} integers, "
                         f"one per input id")
    for i, (token, label) in enumerate(zip(ids, labels)):
        if label not in (token, IGNORE_LABEL):
            raise ValueError(f"{path}:{number}: field 'labels': position {i} is {label}; expected the input id "
                             f"{token} (loss) or {IGNORE_LABEL} (no loss)")
    return ids, [float(label != IGNORE_LABEL) for label in labels]


def read_jsonl(path: str | Path, tokenizer, bos: int | None, eos: int | None, max_len: int,
               vocab_size: int | None = None) -> list[Example]:
    """Read a JSONL file, tokenizing text rows (tokenizer None: only token-id rows); errors name the file and line."""
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
        if isinstance(record, dict) and "input_ids" in record:
            tokens, mask = token_ids(path, number, record, vocab_size)
        elif isinstance(record, dict) and tokenizer is None and ({"prompt", "text"} & set(record)):
            raise ValueError(f"{path}:{number}: a text row needs the model's tokenizer.json, which it has not; "
                             "give token ids as 'input_ids' (and 'labels')")
        elif isinstance(record, dict) and {"prompt", "completion"} <= set(record):
            prompt = head + tokenizer.encode(str(record["prompt"])).ids
            completion = tokenizer.encode(str(record["completion"])).ids + tail
            tokens, mask = prompt + completion, [0.0] * len(prompt) + [1.0] * len(completion)
        elif isinstance(record, dict) and "text" in record:
            tokens = head + tokenizer.encode(str(record["text"])).ids + tail
            mask = [0.0] * len(head) + [1.0] * (len(tokens) - len(head))
        else:
            raise ValueError(f"{path}:{number}: expected an object with 'prompt' and 'completion', 'text', "
                             "or 'input_ids'")
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


def best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` in bins of `capacity`: largest first, each into the bin it leaves fullest, or a new one.

    Best-fit decreasing (TRL's "bfd" packing) fills bins of many mixed sizes almost completely. Bins are looked up
    by their free space (a binary search over at most `capacity` distinct amounts), not scanned one by one.
    Every size must be at most `capacity`."""
    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free space -> the bins with exactly that much
    frees: list[int] = []  # the keys of by_free, ascending
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = bisect.bisect_left(frees, sizes[i])
        if k == len(frees):
            target, free = len(bins), capacity
            bins.append([])
        else:
            free = frees[k]
            target = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                frees.pop(k)
        bins[target].append(i)
        free -= sizes[i]
        if free > 0:
            if free not in by_free:
                by_free[free] = []
                bisect.insort(frees, free)
            by_free[free].append(target)
    return bins


class PackedStream:
    """One adapter's examples packed into rows of seq_len input tokens, `rows` rows a batch.

    Each epoch takes the examples in draw's order and packs them best-fit decreasing (an example fills
    len(tokens) - 1 input positions), then deals the rows out in a seeded order; batches run through the epochs'
    rows back to back, so every example trains once an epoch and a batch may straddle two epochs. The packing
    depends only on the examples' lengths, so every epoch has the same number of rows, and batch t's rows depend
    only on t: a resumed run packs as an uninterrupted one did."""

    def __init__(self, examples: list[Example], rows: int, seq_len: int, seed: int):
        self.examples, self.rows, self.seq_len, self.seed = examples, rows, seq_len, seed
        self._epochs: dict[int, tuple[np.ndarray, list[list[int]]]] = {}
        self.rows_per_epoch = len(self._epoch(0)[1])

    def _epoch(self, epoch: int) -> tuple[np.ndarray, list[list[int]]]:
        """(the epoch's example order, the stream positions in each of its rows), kept for two epochs."""
        if epoch not in self._epochs:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.examples))
            rows = best_fit_decreasing([len(self.examples[i].tokens) - 1 for i in order], self.seq_len)
            deal = np.random.default_rng((self.seed, epoch, 1)).permutation(len(rows))
            base = epoch * len(self.examples)
            self._epochs[epoch] = (order, [[base + j for j in rows[r]] for r in deal])
            if len(self._epochs) > 2:
                del self._epochs[min(e for e in self._epochs if e != epoch)]
        return self._epochs[epoch]

    def _example(self, position: int) -> Example:
        epoch, index = divmod(position, len(self.examples))
        return self.examples[self._epoch(epoch)[0][index]]

    def positions(self, step: int) -> list[list[int]]:
        """The stream positions of the examples in each row of batch `step`."""
        return [self._epoch(g // self.rows_per_epoch)[1][g % self.rows_per_epoch]
                for g in range(step * self.rows, (step + 1) * self.rows)]

    def batch(self, step: int) -> list[list[Example]]:
        """The examples of each of the `rows` rows of batch `step`."""
        return [[self._example(p) for p in row] for row in self.positions(step)]


def pack_batch(rows: list[list[Example]], seq_len: int, pad: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights, segment_ids, positions) (rows, seq_len) of packed rows: example j of a row is
    segment j + 1 (0 = padding) with positions from 0, holding exactly what pad_batch gives it alone."""
    inputs = np.full((len(rows), seq_len), pad, np.int32)
    targets = np.full((len(rows), seq_len), pad, np.int32)
    weights = np.zeros((len(rows), seq_len), np.float32)
    segment_ids = np.zeros((len(rows), seq_len), np.int32)
    positions = np.zeros((len(rows), seq_len), np.int32)
    for i, row in enumerate(rows):
        offset = 0
        for j, example in enumerate(row):
            n = len(example.tokens) - 1
            span = slice(offset, offset + n)
            inputs[i, span], targets[i, span] = example.tokens[:-1], example.tokens[1:]
            weights[i, span], segment_ids[i, span], positions[i, span] = example.loss_mask[1:], j + 1, np.arange(n)
            offset += n
    return inputs, targets, weights, segment_ids, positions


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
