"""`bench compress`: reconstruction error against rank and clusters, and serving throughput with and without
compression, side by side in one run.

The collection is synthetic (compress.synthetic.clustered_adapters: rank-16 LoRAs of the chosen model from a
few task families with shared subspaces plus independent noise), since no real collection of 1000 adapters
ships with the project. Errors are the mean relative error ‖D − D̂‖²/‖D‖² over adapters and modules; the
per-adapter truncated SVD at the same rank is the baseline. Throughput runs one engine per arm on the same
mesh: base only and one adapter (on the uncompressed engine), the whole collection uncompressed (the
adapter pool swaps `max_loras` device slots) and compressed (one bank placed at start-up); ratios are to one
adapter, all measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import model_config, shared_options

NAME = "compress"
HELP = "compression error and compressed serving throughput"
OPTIONS = shared_options(model="demo", model_help="'demo' or a Hugging Face model directory", mesh="1x1",
                         strategy=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic collection, the error table's ranks and clusters, and the throughput runs."""
    parser.add_argument("--adapters", type=int, default=1000, help="adapters in the synthetic collection")
    parser.add_argument("--adapter-rank", type=int, default=16)
    parser.add_argument("--families", type=int, default=8, help="task families planted in the collection")
    parser.add_argument("--noise", type=float, default=0.1, help="independent part of each factor (energy fraction²)")
    parser.add_argument("--ranks", default="8,16,32", help="compression ranks for the error table")
    parser.add_argument("--clusters", default="1,8", help="cluster counts for the error table")
    parser.add_argument("--method", default="full", choices=("full", "diag"))
    parser.add_argument("--serve-rank", type=int, default=16, help="rank of the bank served in the throughput runs")
    parser.add_argument("--serve-clusters", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=8, help="device slots of the uncompressed pool")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128, help="requests per throughput run")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per arm (median reported)")
    parser.add_argument("--skip-serving", action="store_true", help="only the error table")


def _mean_error(bank) -> float:
    """The bank's relative reconstruction error, averaged over modules and adapters."""
    return float(np.mean([m.errors.mean() for m in bank.modules.values()]))


def error_table(adapters, config, ranks, clusters, method: str, keep: tuple[int, int] | None = None):
    """Mean relative error and fit time for every (rank, clusters), with the per-adapter SVD baseline; and the
    bank fitted at `keep` = (rank, clusters) if the table has it (None otherwise)."""
    import jax.numpy as jnp

    from ..compress.compressor import compress_adapters
    from ..compress.joint import truncated_svd_errors
    from ..compress.problems import build_problem, target_modules

    problems = [build_problem(adapters, layer, module, 1, 0, config) for layer, module in target_modules(adapters)]
    rows, kept = [], None
    for rank in ranks:
        svd = float(np.mean([np.asarray(truncated_svd_errors(jnp.asarray(p.a), jnp.asarray(p.b), rank=rank)).mean()
                             for p in problems]))
        for k in clusters:
            start = time.perf_counter()
            bank = compress_adapters(adapters, config, rank, k, method, progress=False)
            rows.append({"rank": rank, "clusters": k, "method": method, "error": _mean_error(bank),
                         "svd_error": svd, "fit_seconds": time.perf_counter() - start, "rounds": bank.fit["rounds"]})
            if (rank, k) == keep:
                kept = bank
    return rows, kept


def _throughput(engine, prompts, names, new_tokens: int, repeats: int) -> float:
    """Median generated tokens/s of the prompts with their adapters, after one warm-up run."""
    engine.generate(prompts, adapters=names, max_tokens=new_tokens, ignore_eos=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.generate(prompts, adapters=names, max_tokens=new_tokens, ignore_eos=True)
        times.append(time.perf_counter() - start)
    return len(prompts) * new_tokens / statistics.median(times)


def serving_table(adapters, config, args, bank_dir: Path) -> dict:
    """tokens/s for base only, one adapter, every adapter uncompressed and every adapter compressed."""
    from ..engine.engine import Engine

    common = {"mesh": args.mesh, "strategy": args.strategy, "max_batch": args.max_batch,
              "max_seq_len": args.prompt_len + args.new_tokens, "lora_impl": "xla"}
    rank = args.adapter_rank * (1 if args.strategy != "bdlora" else int(args.mesh.split("x")[1]))
    plain = Engine.from_pretrained(args.model, max_loras=args.max_loras, max_lora_rank=rank, **common)
    for adapter in adapters:
        plain.add_adapter(adapter.name, adapter)
    compressed = Engine.from_pretrained(args.model, max_loras=1, max_lora_rank=rank, compressed_bank=bank_dir,
                                        **common)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, config.vocab_size, args.prompt_len))) for _ in range(args.requests)]
    picks = [adapters[int(i)].name for i in rng.integers(0, len(adapters), args.requests)]
    arms = {
        "base only": (plain, [None] * args.requests),
        "1 adapter": (plain, [adapters[0].name] * args.requests),
        f"{len(adapters)} adapters uncompressed": (plain, picks),
        f"{len(adapters)} adapters compressed": (compressed, picks),
    }
    results = {label: {"tokens_per_s": _throughput(engine, prompts, names, args.new_tokens, args.repeats)}
               for label, (engine, names) in arms.items()}
    one = results["1 adapter"]["tokens_per_s"]
    for entry in results.values():
        entry["ratio_to_one_adapter"] = entry["tokens_per_s"] / one
    return results


def run(args: argparse.Namespace) -> dict:
    """The error table over ranks and clusters and, unless --skip-serving, the throughput of every arm."""
    from ..compress.compressor import compress_adapters
    from ..compress.synthetic import clustered_adapters

    config = model_config(args.model)
    adapters = clustered_adapters(config, args.adapters, args.adapter_rank, args.families, args.noise)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    clusters = [int(c) for c in args.clusters.split(",") if c]
    rows, bank = error_table(adapters, config, ranks, clusters, args.method, (args.serve_rank, args.serve_clusters))
    report = {"setup": {k: v for k, v in vars(args).items() if k != "json"}, "errors": rows}
    if not args.skip_serving:
        if bank is None:
            bank = compress_adapters(adapters, config, args.serve_rank, args.serve_clusters, args.method)
        with tempfile.TemporaryDirectory() as tmp:
            bank.save(Path(tmp) / "bank")
            report["serve_error"] = _mean_error(bank)
            report["throughput"] = serving_table(adapters, config, args, Path(tmp) / "bank")
    return report


def print_report(report: dict) -> None:
    """The error table, then the throughput of every arm with its ratio to one adapter."""
    s = report["setup"]
    print(f"compression of {s['adapters']} synthetic rank-{s['adapter_rank']} adapters ({s['families']} families, "
          f"noise {s['noise']}) of model {s['model']}, method {s['method']}")
    print(f"{'rank':>6}{'clusters':>10}{'JD error':>12}{'SVD error':>12}{'rounds':>8}{'fit s':>9}")
    for row in report["errors"]:
        print(f"{row['rank']:>6}{row['clusters']:>10}{row['error']:>12.4f}{row['svd_error']:>12.4f}"
              f"{row['rounds']:>8}{row['fit_seconds']:>9.1f}")
    if "throughput" in report:
        print(f"\nthroughput on mesh {s['mesh']}, strategy {s['strategy']}, {s['requests']} requests, max_loras "
              f"{s['max_loras']}, served bank rank {s['serve_rank']} x {s['serve_clusters']} clusters "
              f"(error {report['serve_error']:.4f})")
        print(f"{'arm':<34}{'tokens/s':>12}{'ratio to 1 adapter':>20}")
        for label, entry in report["throughput"].items():
            print(f"{label:<34}{entry['tokens_per_s']:>12.1f}{entry['ratio_to_one_adapter']:>20.3f}")
