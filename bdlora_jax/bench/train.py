"""`bench train`: training throughput and memory at real shapes, through the trainer `python -m bdlora_jax.train` runs.

K adapters get token-id datasets of random tokens (every example seq_len + 1 tokens long, filling a row, or
lengths drawn uniformly from a range), written to a temporary directory; the model has random weights. Batches
of B rows (B/K per adapter; padded, or packed with --packing) train rank-r LoRA adapters. Reported: real tokens/s
(the tokens predicted: n - 1 of an n-token example, padding not counted) over the timed steps after warm-up, the
step's peak memory from its compiled memory analysis (arguments + outputs + temporaries - donated aliases), and
how many times the step compiled, and each timed step's seconds (a step far slower than the others, such as one
that grew the host heap, shows there). --steps 0 only compiles the step and reports its memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ..host_memory import run_cpu_steps_synchronously
from .common import SMALL_32K, model_config, shared_options

NAME = "train"
HELP = "training tokens/s (real tokens), step peak memory and compilations"
OPTIONS = shared_options(model=SMALL_32K, mesh="1x1", strategy=True, dtype="float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adapters, rows, sequence length, example lengths, packing, loss chunking, rank and step counts."""
    parser.add_argument("--adapters", type=int, default=4, help="adapters trained together (K)")
    parser.add_argument("--batch", type=int, default=32, help="rows a step (B, a multiple of K)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens a row")
    parser.add_argument("--lengths", default="fixed",
                        help="example lengths in tokens: fixed (seq_len + 1, one a row) or uniform:LOW-HIGH")
    parser.add_argument("--packing", action="store_true", help="pack examples of one adapter into rows")
    parser.add_argument("--loss-chunk", type=int, default=0, help="cross-entropy chunk in tokens (0: whole)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--examples", type=int, default=512, help="examples in each adapter's dataset")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compilation among them)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (0: only compile and report memory)")
    parser.add_argument("--seed", type=int, default=0)


def example_lengths(spec: str, count: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """`count` example lengths in tokens for --lengths `spec` (fixed: seq_len + 1; uniform:LOW-HIGH)."""
    if spec == "fixed":
        return np.full(count, seq_len + 1)
    kind, _, bounds = spec.partition(":")
    low, _, high = bounds.partition("-")
    if kind != "uniform" or not (low.isdigit() and high.isdigit()) or not 2 <= int(low) <= int(high):
        raise SystemExit(f"--lengths {spec!r}: expected 'fixed' or 'uniform:LOW-HIGH' with 2 <= LOW <= HIGH")
    if int(high) > seq_len + 1:
        raise SystemExit(f"--lengths {spec!r}: examples of up to {high} tokens do not fit --seq-len {seq_len} "
                         f"(at most {seq_len + 1} tokens)")
    return rng.integers(int(low), int(high) + 1, count)


def write_datasets(root: Path, adapters: int, examples: int, lengths: str, seq_len: int, vocab_size: int,
                   seed: int) -> dict[str, Path]:
    """Adapter a{i}'s JSONL of random token ids ({"input_ids"}), the same for the same arguments."""
    paths = {}
    for i in range(adapters):
        rng = np.random.default_rng((seed, i))
        path = root / f"a{i}.jsonl"
        with path.open("w") as f:
            for n in example_lengths(lengths, examples, seq_len, rng):
                f.write(json.dumps({"input_ids": rng.integers(0, vocab_size, n).tolist()}) + "\n")
        paths[f"a{i}"] = path
    return paths


def peak_bytes(compiled) -> dict:
    """The compiled step's memory: arguments, outputs, temporaries, and the peak they make with donation."""
    stats = compiled.memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)
    return {"peak_bytes": int(peak), "temp_bytes": int(stats.temp_size_in_bytes),
            "argument_bytes": int(stats.argument_size_in_bytes)}


def run(args: argparse.Namespace) -> dict:
    """Train args.warmup + args.steps steps and report tokens/s, the step's memory and its compilations."""
    run_cpu_steps_synchronously()
    import jax
    import jax.numpy as jnp

    from ..engine.metrics import CompileCounter
    from ..train.config import TrainConfig
    from ..train.trainer import Trainer

    config = model_config(args.model)
    CompileCounter.install()
    with tempfile.TemporaryDirectory() as root:
        data = write_datasets(Path(root), args.adapters, args.examples, args.lengths, args.seq_len,
                              config.vocab_size, args.seed)
        cfg = TrainConfig(model=args.model, adapters={k: str(v) for k, v in data.items()}, rank=args.rank,
                          alpha=2.0 * args.rank, mesh=args.mesh, strategy=args.strategy, batch_size=args.batch,
                          seq_len=args.seq_len, steps=args.warmup + args.steps, eval_fraction=0.0,
                          seed=args.seed, out_dir=str(Path(root) / "run"), dtype=args.dtype,
                          packing=args.packing, loss_chunk_tokens=args.loss_chunk)
        trainer = Trainer(cfg)
        memory = peak_bytes(trainer._step.lower(trainer.train_state, trainer.state, jnp.int32(0),
                                                trainer.batch(0)).compile())
        step_seconds, tokens, rows_tokens, compiles_timed, losses = [], 0, 0, 0, None
        for step in range(args.warmup + args.steps if args.steps else 0):
            timed = step >= args.warmup
            before = CompileCounter.count()
            started = time.perf_counter()
            rows, _ = trainer.rows(step)
            losses = jax.block_until_ready(trainer.step(step, trainer.batch(step)))
            if timed:
                step_seconds.append(time.perf_counter() - started)
                tokens += sum(len(e.tokens) - 1 for row in rows for e in row)
                rows_tokens += args.batch * args.seq_len
                compiles_timed += CompileCounter.count() - before
    seconds = sum(step_seconds)
    return {"model": config.name, "mesh": args.mesh, "strategy": args.strategy, "adapters": args.adapters,
            "batch": args.batch, "seq_len": args.seq_len, "lengths": args.lengths, "packing": args.packing,
            "loss_chunk": args.loss_chunk, "rank": args.rank, "timed_steps": args.steps,
            "seconds_per_step": seconds / args.steps if args.steps else None, "step_seconds": step_seconds,
            "real_tokens_per_s": tokens / seconds if seconds else None,
            "row_fill": tokens / rows_tokens if rows_tokens else None,
            "step_compilations": trainer._step._cache_size(), "compilations_in_timed_steps": compiles_timed,
            "final_loss": None if losses is None else float(np.asarray(losses).mean()), **memory}


def print_report(report: dict) -> None:
    """One line of settings, then the measurements."""
    print(f"bench train  model={report['model']} mesh={report['mesh']} strategy={report['strategy']} "
          f"adapters={report['adapters']} batch={report['batch']} seq_len={report['seq_len']} "
          f"lengths={report['lengths']} packing={report['packing']} loss_chunk={report['loss_chunk']}")
    if report["real_tokens_per_s"] is not None:
        print(f"  real tokens/s        {report['real_tokens_per_s']:10.1f}   ({report['seconds_per_step']:.3f} s a "
              f"step over {report['timed_steps']} steps, rows {100 * report['row_fill']:.0f}% real tokens)")
        print("  each timed step      " + " ".join(f"{s:.3f}" for s in report["step_seconds"]) + " s")
    print(f"  step peak memory     {report['peak_bytes'] / 2**20:10.1f} MiB (temporaries "
          f"{report['temp_bytes'] / 2**20:.1f} MiB)")
    print(f"  step compilations    {report['step_compilations']:10d}   ({report['compilations_in_timed_steps']} "
          f"during timed steps)")
