"""`bench kernel`: one layer's per-device LoRA timed for the Pallas kernels, the XLA gather, a one-hot einsum and
lax.ragged_dot, with achieved bandwidth against the device's peak (needs a GPU; says so otherwise)."""

from __future__ import annotations

import argparse

from .common import LLAMA_8B, int_list, model_config, shared_options

NAME = "kernel"
HELP = "time the LoRA kernels against XLA alternatives (GPU)"
OPTIONS = shared_options(model=LLAMA_8B, strategy=True, dtype="bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model-axis size, ranks, adapter counts and token counts to time, and the timed calls per measurement."""
    parser.add_argument("--model-size", type=int, default=8, help="model-axis size whose per-device shapes are timed")
    parser.add_argument("--ranks", type=int_list, default=[8, 16, 32, 64, 128], help="max_lora_rank values, e.g. 8,16")
    parser.add_argument("--adapters", type=int_list, default=[1, 4, 16, 64, 256], help="distinct adapters per batch")
    parser.add_argument("--decode-tokens", type=int, default=256, help="decode rows (one token each)")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="prompt tokens of one prefill")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per measurement (the median is reported)")


def run(args: argparse.Namespace) -> dict:
    """Time the LoRA implementations for every rank, adapter count and mode (lora_timing.kernel_report)."""
    from .lora_timing import kernel_report

    config = model_config(args.model)
    report = kernel_report(config, args.strategy, args.model_size, args.ranks, args.adapters,
                           {"decode": args.decode_tokens, "prefill": args.prefill_tokens}, args.dtype, args.iters)
    report["setup"] = {"model": config.name, "strategy": args.strategy, "model_size": args.model_size,
                       "ranks": args.ranks, "adapters": args.adapters, "decode_tokens": args.decode_tokens,
                       "prefill_tokens": args.prefill_tokens, "dtype": args.dtype, "iters": args.iters}
    return report


def print_report(report: dict) -> None:
    """A table per mode and rank: microseconds, GB/s, fraction of peak and speedup over the XLA gather per method."""
    if not report["gpu"]:
        print(report["message"])
        return
    setup = report["setup"]
    peak = report["peak_gbps"]
    print(f"one layer's per-device LoRA of {setup['model']} at model-axis {setup['model_size']}, strategy "
          f"{setup['strategy']}, {setup['dtype']}, on {report['device']} (peak "
          f"{'unknown' if peak is None else f'{peak:.0f} GB/s'})")
    print(f"{'mode':<9}{'rank':>5}{'adapters':>9}{'tokens':>7}  {'method':<14}{'us':>10}{'GB/s':>9}{'of peak':>9}"
          f"{'vs xla':>8}")
    for row in report["rows"]:
        fraction = "-" if row["peak_fraction"] is None else f"{row['peak_fraction']:.1%}"
        print(f"{row['mode']:<9}{row['rank']:>5}{row['adapters']:>9}{row['tokens']:>7}  {row['method']:<14}"
              f"{row['us']:>10.1f}{row['gbps']:>9.1f}{fraction:>9}{row['speedup_vs_xla_gather']:>7.2f}x")
