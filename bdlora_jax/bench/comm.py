"""`bench comm`: the collectives of one compiled decode step, for the base model, with the strategy's adapters,
and the extra the adapters add (in total and per layer); compiled from abstract shapes, so nothing is allocated."""

from __future__ import annotations

import argparse

from .common import LLAMA_8B, model_config, shared_options

NAME = "comm"
HELP = "count the collectives of a compiled decode step"
OPTIONS = shared_options(model=LLAMA_8B, mesh="1x8", strategy=True, dtype="bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The decode step's shape: adapter rank, batch, context and adapter slots (shared with `bench lower`)."""
    parser.add_argument("--rank", type=int, default=16, help="max_lora_rank of the adapter bank")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-loras", type=int, default=8)


def decode_step(args: argparse.Namespace) -> tuple:
    """(ModelConfig, ShardingPlan, DecodeShape, setup dict) of the decode step the arguments describe."""
    from ..comm import DecodeShape
    from ..mesh import make_mesh
    from ..sharding import make_plan

    config = model_config(args.model)
    plan = make_plan(make_mesh(args.mesh), args.strategy, config, args.rank)
    shape = DecodeShape(batch=args.batch, max_seq_len=args.seq_len, max_loras=args.max_loras, rank=args.rank,
                        dtype=args.dtype)
    setup = {"model": config.name, "layers": config.num_layers, "mesh": args.mesh, "strategy": args.strategy,
             "rank": args.rank, "batch": args.batch, "seq_len": args.seq_len, "max_loras": args.max_loras,
             "dtype": args.dtype}
    return config, plan, shape, setup


def run(args: argparse.Namespace) -> dict:
    """Compile the decode step twice (without and with adapters) and report the collectives."""
    from ..comm import communication_report

    config, plan, shape, setup = decode_step(args)
    report = communication_report(config, plan, shape)
    report["setup"] = setup
    report["extra_per_layer"] = {k: v["count"] / config.num_layers for k, v in report["extra"].items()}
    return report


def print_report(report: dict) -> None:
    """A table of collective counts per kind: base, with LoRA, extra, extra per layer and extra bytes."""
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
