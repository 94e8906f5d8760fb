"""`python -m bdlora_jax.bench <subcommand>`: measurements printed side by side (JSON with --json).

Subcommands:
  comm   collectives of one compiled decode step: base model, with the strategy's adapters, and the extra.
  serve  offline generation throughput: base only, one adapter, N distinct adapters, with ratios to base.
  step   one decode step (base only, 1 and N adapters) and the sampler against the weight-matmul floor.
  demo-accuracy  exact-match accuracy of each demo task adapter on held-out words, adapters mixed in batches.
  kernel one layer's per-device LoRA timed for the Pallas kernels, the XLA gather, a one-hot einsum and
         lax.ragged_dot, with achieved bandwidth against the device's peak (needs a GPU; says so otherwise).
  lower  the Triton kernels of one decode step with lora_impl="pallas", lowered for CUDA (no GPU needed).
  ablate a resumable sweep of strategy x mesh x rank x adapters x batch from configs/ablations/*.yaml:
         decode step (tokens/s, collectives) and end-to-end serving, into results.jsonl, a table and plots.
  compress  reconstruction error of compressed adapter collections against rank and clusters, and serving
         throughput side by side: base only, one adapter, N adapters uncompressed (pool swapping) and compressed.
  cost   predicted GPU decode-step time (roofline + ring collectives) of S-LoRA at rank r and BD-LoRA at 2r, 4r
         on device profiles (configs/devices/*.yaml), and BD-LoRA's predicted speed-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import bench_ablate, bench_compress, bench_cost, bench_demo, bench_serve, bench_step
from .mesh import emulate_host_devices


def _model_config(spec: str):
    """A ModelConfig from --model ("demo", a configs/models/*.yaml file or a Hugging Face model directory)."""
    from .checkpoint import resolve_model_config

    try:
        return resolve_model_config(spec)
    except ValueError as e:
        raise SystemExit(f"--model {spec!r}: {e}") from None


def run_comm(args: argparse.Namespace) -> dict:
    """Compile the decode step twice (without and with adapters) and report the collectives."""
    from .comm import DecodeShape, communication_report
    from .mesh import make_mesh
    from .sharding import make_plan

    config = _model_config(args.model)
    plan = make_plan(make_mesh(args.mesh), args.strategy, config, args.rank)
    shape = DecodeShape(batch=args.batch, max_seq_len=args.seq_len, max_loras=args.max_loras, rank=args.rank,
                        dtype=args.dtype)
    report = communication_report(config, plan, shape)
    report["setup"] = {"model": config.name, "layers": config.num_layers, "mesh": args.mesh,
                       "strategy": args.strategy, "rank": args.rank, "batch": args.batch,
                       "seq_len": args.seq_len, "max_loras": args.max_loras, "dtype": args.dtype}
    report["extra_per_layer"] = {k: v["count"] / config.num_layers for k, v in report["extra"].items()}
    return report


def _print_comm(report: dict) -> None:
    setup = report["setup"]
    print(f"decode step of {setup['model']} ({setup['layers']} layers), mesh {setup['mesh']}, strategy "
          f"{setup['strategy']}, rank {setup['rank']}, batch {setup['batch']}, {setup['dtype']}")
    print(f"{'collective':<20}{'base':>16}{'with LoRA':>16}{'extra':>16}{'extra/layer':>13}{'extra bytes':>14}")
    for kind in sorted(set(report["base"]) | set(report["with_lora"])):
        base = report["base"].get(kind, {"count": 0})["count"]
        with_lora = report["with_lora"].get(kind, {"count": 0})["count"]
        extra = report["extra"][kind]
        print(f"{kind:<20}{base:>16}{with_lora:>16}{extra['count']:>16}"
              f"{report['extra_per_layer'][kind]:>13.2f}{extra['bytes']:>14}")
    promoted = report["with_lora"].get("all-reduce", {}).get("promoted", 0)
    if promoted:
        print(f"note: the {report['platform']} backend reduces {promoted} narrow-float all-reduces in float32; "
              "their bytes are float32 bytes")


def run_kernel(args: argparse.Namespace) -> dict:
    """Time the LoRA implementations for every rank, adapter count and mode (bench_kernel.kernel_report)."""
    from .bench_kernel import kernel_report

    config = _model_config(args.model)
    report = kernel_report(config, args.strategy, args.model_size, args.ranks, args.adapters,
                           {"decode": args.decode_tokens, "prefill": args.prefill_tokens}, args.dtype, args.iters)
    report["setup"] = {"model": config.name, "strategy": args.strategy, "model_size": args.model_size,
                       "ranks": args.ranks, "adapters": args.adapters, "decode_tokens": args.decode_tokens,
                       "prefill_tokens": args.prefill_tokens, "dtype": args.dtype, "iters": args.iters}
    return report


def run_lower(args: argparse.Namespace) -> dict:
    """Lower the pallas decode step for a GPU platform and list its Triton kernels (bench_kernel.lower_report)."""
    from .bench_kernel import lower_report
    from .comm import DecodeShape
    from .mesh import make_mesh
    from .sharding import make_plan

    config = _model_config(args.model)
    plan = make_plan(make_mesh(args.mesh), args.strategy, config, args.rank)
    shape = DecodeShape(batch=args.batch, max_seq_len=args.seq_len, max_loras=args.max_loras, rank=args.rank,
                        dtype=args.dtype)
    report = lower_report(config, plan, shape, args.platform)
    report["setup"] = {"model": config.name, "layers": config.num_layers, "mesh": args.mesh,
                       "strategy": args.strategy, "rank": args.rank, "batch": args.batch,
                       "seq_len": args.seq_len, "max_loras": args.max_loras, "dtype": args.dtype}
    return report


def _print_kernel(report: dict) -> None:
    from .bench_kernel import format_kernel_report

    print(format_kernel_report(report))


def _print_lower(report: dict) -> None:
    from .bench_kernel import format_lower_report

    print(format_lower_report(report))


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bdlora_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    comm = sub.add_parser("comm", help="count the collectives of a compiled decode step")
    comm.add_argument("--model", default="configs/models/llama-3.1-8b.yaml")
    comm.add_argument("--mesh", default="1x8")
    comm.add_argument("--strategy", default="bdlora", choices=("replicated", "slora", "bdlora"))
    comm.add_argument("--rank", type=int, default=16, help="max_lora_rank of the adapter bank")
    comm.add_argument("--batch", type=int, default=16)
    comm.add_argument("--seq-len", type=int, default=2048)
    comm.add_argument("--max-loras", type=int, default=8)
    comm.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    comm.add_argument("--json", action="store_true", help="print one JSON object")
    bench_serve.add_arguments(sub.add_parser("serve", help="offline throughput with 0, 1 and N distinct adapters"))
    bench_step.add_arguments(sub.add_parser("step", help="decode step and sampler against the weight-matmul floor"))
    bench_demo.add_arguments(sub.add_parser("demo-accuracy", help="exact match of the demo task adapters"))
    bench_ablate.add_arguments(sub.add_parser("ablate", help="sweep a grid of strategies, meshes, ranks, adapters"))
    bench_compress.add_arguments(sub.add_parser("compress", help="compression error and compressed serving throughput"))
    bench_cost.add_arguments(sub.add_parser("cost", help="predicted GPU decode-step time and BD-LoRA speed-up"))
    kernel = sub.add_parser("kernel", help="time the LoRA kernels against XLA alternatives (GPU)")
    kernel.add_argument("--model", default="configs/models/llama-3.1-8b.yaml")
    kernel.add_argument("--strategy", default="bdlora", choices=("replicated", "slora", "bdlora"))
    kernel.add_argument("--model-size", type=int, default=8, help="model-axis size whose per-device shapes are timed")
    kernel.add_argument("--ranks", type=_int_list, default=[8, 16, 32, 64, 128], help="max_lora_rank values, e.g. 8,16")
    kernel.add_argument("--adapters", type=_int_list, default=[1, 4, 16, 64, 256], help="distinct adapters per batch")
    kernel.add_argument("--decode-tokens", type=int, default=256, help="decode rows (one token each)")
    kernel.add_argument("--prefill-tokens", type=int, default=2048, help="prompt tokens of one prefill")
    kernel.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    kernel.add_argument("--iters", type=int, default=20, help="timed calls per measurement (the median is reported)")
    kernel.add_argument("--json", action="store_true", help="print one JSON object")
    lower = sub.add_parser("lower", help="list the Triton kernels of a pallas decode step lowered for a GPU")
    lower.add_argument("--model", default="configs/models/llama-3.1-8b.yaml")
    lower.add_argument("--mesh", default="1x8")
    lower.add_argument("--strategy", default="bdlora", choices=("replicated", "slora", "bdlora"))
    lower.add_argument("--rank", type=int, default=16, help="max_lora_rank of the adapter bank")
    lower.add_argument("--batch", type=int, default=16)
    lower.add_argument("--seq-len", type=int, default=2048)
    lower.add_argument("--max-loras", type=int, default=8)
    lower.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    lower.add_argument("--platform", default="cuda", choices=("cuda",), help="the GPU platform to lower for")
    lower.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emulate_host_devices(getattr(args, "mesh", "1x1"))
    logging.basicConfig(level=logging.INFO if not args.json else logging.WARNING, format="%(message)s")
    run, show = {"comm": (run_comm, _print_comm), "serve": (bench_serve.run, bench_serve.print_report),
                 "step": (bench_step.run, bench_step.print_report),
                 "demo-accuracy": (bench_demo.run, bench_demo.print_report),
                 "ablate": (bench_ablate.run, bench_ablate.print_report),
                 "compress": (bench_compress.run, bench_compress.print_report),
                 "cost": (bench_cost.run, bench_cost.print_report),
                 "kernel": (run_kernel, _print_kernel), "lower": (run_lower, _print_lower)}[args.command]
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        show(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
