"""`bench serve`: offline generation throughput for base only, one adapter and N distinct adapters, side by side.

Every configuration runs in the same process on the same engine (one compile, a warm-up pass first), and
the reported ratios are to base-only throughput measured in the same run. Adapters are BD-LoRA with one
block per device (served densified under `replicated` and `slora`), all resident (max_loras = largest N),
so the numbers show the cost of mixing adapters in a batch, not of swapping them. "base only" is requests
without an adapter on the same adapter-enabled engine (as vLLM serves base-model requests with LoRA on).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from ..config import KV_CACHES
from .common import SMALL_32K, model_config, shared_options

NAME = "serve"
HELP = "offline throughput with 0, 1 and N distinct adapters"
OPTIONS = shared_options(model=SMALL_32K, model_help="HF model directory, configs/models/*.yaml (random weights), or demo",
                         mesh="1x1", strategy=True, dtype="float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Batch, prompt and generation lengths, adapter rank, the adapter counts to compare and the timed runs."""
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", default="8,32", help="comma-separated numbers of distinct adapters")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--kv-cache", default="contiguous", choices=KV_CACHES, help="the engine's KV cache")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page (paged)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256, help="tokens of one ragged step (paged)")


def _engine(args: argparse.Namespace, max_loras: int, compressed_bank: Path | None = None):
    """The engine of a bench run: "demo" or a model directory with its weights, or a model config (a *.yaml file
    or the name of a shipped one) with random weights."""
    import jax.numpy as jnp

    from ..config import EngineConfig
    from ..demo import resolve_model_path
    from ..engine.engine import Engine
    from ..mesh import make_mesh
    from ..model.llama import init_model
    from ..sharding import make_plan

    max_seq_len = args.prompt_len + args.new_tokens
    paging = dict(kv_cache=args.kv_cache, page_size=args.page_size, max_num_batched_tokens=args.max_num_batched_tokens)
    if not resolve_model_path(args.model).is_dir():
        config = model_config(args.model)
        plan = make_plan(make_mesh(args.mesh), args.strategy, config, args.rank)
        engine_config = EngineConfig(mesh=args.mesh, strategy=args.strategy, max_loras=max_loras,
                                     max_lora_rank=args.rank, max_batch=args.batch, max_seq_len=max_seq_len,
                                     dtype=args.dtype, lora_impl="xla", **paging)
        compressed = None
        if compressed_bank is not None:
            from ..adapters.compressed import CompressedServing

            compressed = CompressedServing.from_directory(compressed_bank, config, plan, args.dtype)
        return Engine(config, init_model(config, plan, jnp.dtype(args.dtype)), engine_config, None, plan, compressed)
    return Engine.from_pretrained(args.model, mesh=args.mesh, strategy=args.strategy, max_loras=max_loras,
                                  max_lora_rank=args.rank, max_batch=args.batch, max_seq_len=max_seq_len,
                                  dtype=args.dtype, lora_impl="xla", compressed_bank=compressed_bank, **paging)


def run(args: argparse.Namespace) -> dict:
    """Measure tokens/s for each configuration and the ratio of each to base only."""
    from ..adapters.synthetic import random_adapter

    counts = [int(n) for n in args.adapters.split(",") if n]
    engine = _engine(args, max(counts + [1]))
    nblocks = engine.plan.model_size
    for i in range(max(counts + [1])):
        engine.add_adapter(f"a{i}", random_adapter(engine.model_config, f"a{i}", rank=args.rank, nblocks=nblocks,
                                                   seed=i))
    configurations = {"base only": [None] * args.batch, "1 adapter": ["a0"] * args.batch}
    configurations.update({f"{n} adapters": [f"a{i % n}" for i in range(args.batch)] for n in counts})
    return {
        "setup": {"model": engine.model_config.name, "mesh": args.mesh, "strategy": args.strategy, "batch": args.batch,
                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rank": args.rank,
                  "kv_cache": args.kv_cache,
                  "dtype": args.dtype, "platform": engine.plan.mesh.devices.flat[0].platform},
        "results": throughput(engine, configurations, args.prompt_len, args.new_tokens, args.repeats),
    }


def throughput(engine, configurations: dict[str, list], prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Median tokens/s of generating for each configuration's per-request adapters, and each one's ratio to the
    "base only" configuration; warmed up first, then timed interleaved so load drift hits all alike."""
    batch = len(next(iter(configurations.values())))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, engine.model_config.vocab_size, prompt_len)) for _ in range(batch)]

    def timed(names):
        start = time.perf_counter()
        engine.generate(prompts, adapters=names, max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return time.perf_counter() - start

    for names in configurations.values():
        timed(names)  # warm-up: compiles and loads every adapter into its slot
    samples: dict[str, list[float]] = {label: [] for label in configurations}
    for _ in range(repeats):
        for label, names in configurations.items():
            samples[label].append(timed(names))
    results = {}
    for label, times in samples.items():
        seconds = statistics.median(times)
        results[label] = {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds}
    base = results["base only"]["tokens_per_s"]
    for entry in results.values():
        entry["ratio_to_base"] = entry["tokens_per_s"] / base
    return results


def print_report(report: dict) -> None:
    """One line per configuration: tokens/s and the ratio to base only."""
    s = report["setup"]
    print(f"offline generation, {s['model']} on mesh {s['mesh']} ({s['platform']}), strategy {s['strategy']}, "
          f"batch {s['batch']}, prompt {s['prompt_len']}, new tokens {s['new_tokens']}, rank {s['rank']}")
    print(f"{'configuration':<16}{'tokens/s':>12}{'ratio to base':>16}")
    for label, entry in report["results"].items():
        print(f"{label:<16}{entry['tokens_per_s']:>12.1f}{entry['ratio_to_base']:>16.3f}")
