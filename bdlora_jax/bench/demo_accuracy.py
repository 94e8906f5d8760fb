"""`bench demo-accuracy`: exact-match accuracy of each demo adapter on held-out words, all adapters mixed in batches."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import shared_options

HELD_OUT_SEED = 1  # scripts/make_demo.py trains on seed 0
NAME = "demo-accuracy"
HELP = "exact match of the demo task adapters"
OPTIONS = shared_options(model="demo", model_help="'demo' or a HF model directory", mesh="1x1", strategy=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the adapters come from (a directory or a compressed bank), held-out inputs and engine limits."""
    parser.add_argument("--adapters-dir", type=Path, default=None,
                        help="directory of task adapters (default: the demo's)")
    parser.add_argument("--n", type=int, default=100, help="held-out inputs per adapter")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--compressed-bank", type=Path, default=None,
                        help="serve the task adapters from this compressed bank (bdlora_jax.compress) instead")


def demo_accuracy(model: str = "demo", adapters_dir: Path | None = None, mesh: str = "1x1", strategy: str = "bdlora",
                  n: int = 100, max_batch: int = 32, max_lora_rank: int = 16,
                  compressed_bank: Path | None = None) -> dict:
    """{"accuracy": {adapter: fraction exact}, "setup": {...}}: greedy answers, requests of all adapters interleaved.

    With compressed_bank the task adapters are the bank's (named like the tasks) and nothing is registered.
    """
    from ..demo import DEMO_DIR
    from ..demo.tasks import ADAPTER_TASKS, examples
    from ..engine.engine import Engine

    adapters_dir = Path(adapters_dir) if adapters_dir is not None else DEMO_DIR / "adapters"
    engine = Engine.from_pretrained(model, mesh=mesh, strategy=strategy, max_loras=len(ADAPTER_TASKS),
                                    max_lora_rank=max_lora_rank, max_batch=max_batch, max_seq_len=64,
                                    compressed_bank=compressed_bank)
    if compressed_bank is not None:
        names = [t for t in ADAPTER_TASKS if engine.has_adapter(t)]
        source = compressed_bank
    else:
        names = [t for t in ADAPTER_TASKS if (adapters_dir / t).is_dir()]
        source = adapters_dir
        for name in names:
            engine.add_adapter(name, adapters_dir / name)
    if not names:
        raise SystemExit(f"{source}: no task adapters ({', '.join(ADAPTER_TASKS)}) found")
    cases = {name: examples(name, n, HELD_OUT_SEED) for name in names}
    prompts, owners, expected = [], [], []
    for i in range(n):
        for name in names:
            prompts.append(engine.tokenizer.encode("<s>" + cases[name][i]["prompt"]).ids)
            owners.append(name)
            expected.append(cases[name][i]["completion"])
    eos = engine.model_config.eos_token_ids
    results = engine.generate(prompts, adapters=owners, max_tokens=20, temperature=0.0, stop_token_ids=eos)
    correct = {name: 0 for name in names}
    for result, name, want in zip(results, owners, expected):
        tokens = [t for t in result.token_ids if t not in eos]
        correct[name] += int(result.finish_reason == "stop" and engine.tokenizer.decode(tokens) == want)
    return {"accuracy": {name: correct[name] / n for name in names},
            "setup": {"model": engine.model_config.name, "mesh": mesh, "strategy": strategy, "n": n,
                      "adapters": str(source), "compressed": compressed_bank is not None}}


def run(args: argparse.Namespace) -> dict:
    """demo_accuracy with the command-line arguments."""
    return demo_accuracy(args.model, args.adapters_dir, args.mesh, args.strategy, args.n, args.max_batch,
                         args.max_lora_rank, args.compressed_bank)


def print_report(report: dict) -> None:
    """One line per adapter: its exact-match accuracy."""
    s = report["setup"]
    print(f"demo exact-match accuracy, {s['model']} on mesh {s['mesh']}, strategy {s['strategy']}, n={s['n']} "
          f"per adapter, adapters from {s['adapters']}{' (compressed bank)' if s['compressed'] else ''}")
    for name, accuracy in report["accuracy"].items():
        print(f"{name:<10}{accuracy:>8.1%}")
