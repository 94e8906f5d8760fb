"""The demo adapters' text tasks: exact answers for random lowercase words, as prompt "word=" -> completion.

`python -m bdlora_jax.demo.tasks --out data/demo` writes their training data as JSONL.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable
from pathlib import Path


def caesar(text: str, shift: int = 3) -> str:
    return "".join(chr((ord(c) - 97 + shift) % 26 + 97) if c.islower() else c for c in text)


TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "upper": str.upper,
    "caesar": caesar,
    "reverse": lambda s: s[::-1],
    "double": lambda s: "".join(c + c for c in s),
}
ADAPTER_TASKS = ("upper", "caesar", "reverse", "double")


def random_word(rng: random.Random, low: int = 3, high: int = 8) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def examples(task: str, n: int, seed: int) -> list[dict[str, str]]:
    """n {"prompt", "completion"} pairs of a task; different seeds give (almost surely) different words."""
    rng = random.Random(f"{task}-{seed}")
    fn = TASKS[task]
    out = []
    for _ in range(n):
        word = random_word(rng)
        out.append({"prompt": f"{word}=", "completion": fn(word)})
    return out


def write_datasets(out_dir: str | Path, n: int = 4000, seed: int = 0, tasks=ADAPTER_TASKS) -> dict[str, Path]:
    """One JSONL training file per task under out_dir; returns task -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in tasks:
        path = out_dir / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in examples(task, n, seed)))
        paths[task] = path
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the demo tasks' JSONL training data")
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--n", type=int, default=4000)
    args = parser.parse_args()
    for task, path in write_datasets(args.out, args.n).items():
        print(f"{task}: {path}")
