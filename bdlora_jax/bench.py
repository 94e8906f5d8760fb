"""`python -m bdlora_jax.bench <subcommand>`: measurements printed side by side (JSON with --json).

Subcommands:
  comm   collectives of one compiled decode step: base model, with the strategy's adapters, and the extra.
  serve  offline generation throughput: base only, one adapter, N distinct adapters, with ratios to base.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import bench_serve
from .mesh import emulate_host_devices


def _model_config(spec: str):
    """A ModelConfig from a configs/models/*.yaml file or a Hugging Face model directory."""
    from .checkpoint import load_model_config
    from .config import load_model_config_yaml

    path = Path(spec)
    if path.is_dir():
        return load_model_config(path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_model_config_yaml(path)
    raise SystemExit(f"--model {spec!r}: expected a configs/models/*.yaml file or a Hugging Face model directory")


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emulate_host_devices(args.mesh)
    logging.basicConfig(level=logging.INFO if not args.json else logging.WARNING, format="%(message)s")
    run, show = {"comm": (run_comm, _print_comm), "serve": (bench_serve.run, bench_serve.print_report)}[args.command]
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        show(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
