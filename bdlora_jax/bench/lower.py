"""`bench lower`: the Triton kernels of one decode step with lora_impl="pallas", lowered for CUDA from abstract
shapes (no GPU needed), with their call counts and launch grids."""

from __future__ import annotations

import argparse

from . import comm
from .common import LLAMA_8B, shared_options

NAME = "lower"
HELP = "list the Triton kernels of a pallas decode step lowered for a GPU"
OPTIONS = shared_options(model=LLAMA_8B, mesh="1x8", strategy=True, dtype="bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The decode step's shape (as for `bench comm`) and the platform to lower for."""
    comm.add_arguments(parser)
    parser.add_argument("--platform", default="cuda", choices=("cuda",), help="the GPU platform to lower for")


def run(args: argparse.Namespace) -> dict:
    """Lower the pallas decode step for the platform and list its Triton kernels (triton_lowering.lower_report)."""
    from .triton_lowering import lower_report

    config, plan, shape, setup = comm.decode_step(args)
    report = lower_report(config, plan, shape, args.platform)
    report["setup"] = setup
    return report


def print_report(report: dict) -> None:
    """The Triton kernels of the lowered decode step: name, calls and launch grids."""
    setup = report["setup"]
    print(f"decode step of {setup['model']} ({setup['layers']} layers), mesh {setup['mesh']}, strategy "
          f"{setup['strategy']}, rank {setup['rank']}, batch {setup['batch']}, {setup['dtype']}, lora_impl=pallas, "
          f"lowered for {report['platform']}: {report['triton_calls']} Triton calls "
          f"({report['per_layer']:g} per layer)")
    print(f"{'kernel':<20}{'calls':>7}  grids (x*y*z: calls)")
    for name, info in report["kernels"].items():
        grids = ", ".join(f"{grid}: {n}" for grid, n in info["grids"].items())
        print(f"{name:<20}{info['count']:>7}  {grids}")
