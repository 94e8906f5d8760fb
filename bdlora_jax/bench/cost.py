"""`bench cost`: predicted decode-step time of S-LoRA at rank r and BD-LoRA at m·r, and BD-LoRA's speed-up.

For each S-LoRA rank r and each multiplier m (the paper pairs rank-r LoRA with rank-2r and rank-4r BD-LoRA,
0.86-0.87x and 1.73-1.74x the adapter parameters), the decode step is compiled from abstract shapes for
`slora` at rank r and `bdlora` at rank m·r, turned into a StepCost (cost_model.step_cost) and priced on
every device profile. The speed-up is the S-LoRA step time over the BD-LoRA step time. It is a prediction
for one decode step, not an end-to-end serving measurement.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from .common import LLAMA_8B, int_list, model_config, shared_options

DEVICES = ("configs/devices/a100-80gb-nvlink.yaml", "configs/devices/h100-sxm.yaml")
NAME = "cost"
HELP = "predicted GPU decode-step time and BD-LoRA speed-up"
OPTIONS = shared_options(model=LLAMA_8B, mesh="1x8", dtype="bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Device profiles, the S-LoRA ranks and BD-LoRA multipliers to pair, and the decode step's shape."""
    parser.add_argument("--device", action="append", default=None,
                        help=f"configs/devices/*.yaml, repeatable (default: {', '.join(DEVICES)})")
    parser.add_argument("--ranks", type=int_list, default=[16, 64], help="S-LoRA ranks r, e.g. 16,64")
    parser.add_argument("--multipliers", type=int_list, default=[2, 4], help="BD-LoRA rank = m·r for each m")
    parser.add_argument("--batch", type=int, default=16, help="decode rows (one token each)")
    parser.add_argument("--seq-len", type=int, default=2048, help="KV-cache length every row attends over")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=1, help="distinct adapters whose factors a step reads")


def _device_profile(spec: str):
    """The DeviceProfile --device names: a profile file, or a shipped one by name or configs/devices/NAME.yaml."""
    from ..configs import find_config
    from ..cost_model import load_device_profile

    try:
        return load_device_profile(find_config(spec, "devices"))
    except ValueError as e:
        raise SystemExit(f"--device {spec!r}: {e}") from None


def _step(config, mesh, strategy: str, rank: int, args: argparse.Namespace) -> dict:
    """{strategy, rank, cost}: the StepCost of the compiled decode step of `strategy` at `rank`."""
    from ..comm import DecodeShape
    from ..cost_model import step_cost
    from ..sharding import make_plan

    shape = DecodeShape(batch=args.batch, max_seq_len=args.seq_len, max_loras=args.max_loras, rank=rank,
                        dtype=args.dtype)
    cost = step_cost(config, make_plan(mesh, strategy, config, rank), shape, adapters=args.adapters)
    return {"strategy": strategy, "rank": rank, "cost": cost}


def run(args: argparse.Namespace) -> dict:
    """Compile every step once, price it on every device, and pair each S-LoRA step with its BD-LoRA steps."""
    from ..cost_model import predict
    from ..mesh import make_mesh

    config = model_config(args.model)
    profiles = [_device_profile(p) for p in (args.device or DEVICES)]
    mesh = make_mesh(args.mesh)
    steps = {}
    for r in args.ranks:
        steps[("slora", r)] = _step(config, mesh, "slora", r, args)
        for m in args.multipliers:
            if ("bdlora", m * r) not in steps:
                steps[("bdlora", m * r)] = _step(config, mesh, "bdlora", m * r, args)
    rows = []
    for step in steps.values():
        cost = step["cost"]
        times = {}
        for profile in profiles:
            time = predict(cost, profile)
            times[profile.name] = {**asdict(time), "total": time.total}
        rows.append({"strategy": step["strategy"], "rank": step["rank"], "flops": cost.flops,
                     "flops_source": cost.flops_source, "bytes": cost.bytes_moved,
                     "collectives": {c.kind: {"count": c.count, "bytes": c.bytes} for c in cost.collectives},
                     "seconds": times})
    by_key = {(row["strategy"], row["rank"]): row for row in rows}
    speedups = []
    for r in args.ranks:
        for m in args.multipliers:
            slora, bdlora = by_key[("slora", r)], by_key[("bdlora", m * r)]
            speedups.append({"slora_rank": r, "bdlora_rank": m * r, "multiplier": m, "speedup": {
                p.name: slora["seconds"][p.name]["total"] / bdlora["seconds"][p.name]["total"] for p in profiles}})
    return {
        "setup": {"model": config.name, "layers": config.num_layers, "mesh": args.mesh, "batch": args.batch,
                  "seq_len": args.seq_len, "max_loras": args.max_loras, "adapters": args.adapters,
                  "dtype": args.dtype, "ranks": args.ranks, "multipliers": args.multipliers},
        "devices": {p.name: {"hbm_bandwidth": p.hbm_bandwidth, "peak_flops": p.peak_flops,
                             "collective_latency": p.collective_latency, "link_bandwidth": p.link_bandwidth,
                             "sources": dict(p.sources)} for p in profiles},
        "steps": rows,
        "speedups": speedups,
    }


def print_report(report: dict) -> None:
    """A table of every step's predicted times per device, then BD-LoRA's speed-up per rank pair."""
    s = report["setup"]
    devices = list(report["devices"])
    print(f"predicted decode step of {s['model']} ({s['layers']} layers), mesh {s['mesh']}, batch {s['batch']}, "
          f"context {s['seq_len']}, {s['adapters']} adapter(s) read per step, {s['dtype']}")
    print(f"{'strategy':<10}{'rank':>6}{'GFLOP/dev':>11}{'GB/dev':>8}{'collectives':>13}  "
          + "".join(f"{name[:30]:>32}" for name in devices))
    print(f"{'':<50}" + "".join(f"{'compute/memory/comm/total us':>32}" for _ in devices))
    for row in report["steps"]:
        count = sum(c["count"] for c in row["collectives"].values())
        cells = "".join(f"{t['compute'] * 1e6:>8.0f}{t['memory'] * 1e6:>8.0f}{t['communication'] * 1e6:>8.0f}"
                        f"{t['total'] * 1e6:>8.0f}" for t in (row["seconds"][name] for name in devices))
        print(f"{row['strategy']:<10}{row['rank']:>6}{row['flops'] / 1e9:>11.2f}{row['bytes'] / 1e9:>8.3f}"
              f"{count:>13}  {cells}")
    print(f"{'BD-LoRA / S-LoRA speed-up':<26}" + "".join(f"{name[:30]:>32}" for name in devices))
    for entry in report["speedups"]:
        label = f"r={entry['slora_rank']} vs {entry['bdlora_rank']}"
        print(f"{label:<26}" + "".join(f"{entry['speedup'][name]:>31.3f}x" for name in devices))
