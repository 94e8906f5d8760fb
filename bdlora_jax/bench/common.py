"""What the bench subcommands share: the parent parser of the common options, the model default and resolution,
list arguments, and printing a report as a table or one JSON object."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from ..config import DTYPES, STRATEGIES
from ..distributed import add_cluster_flags

# The default model of the subcommands that compile Llama-3.1-8B shapes; the path is the shipped config's
# (bdlora_jax/configs/models), so it resolves from any working directory.
LLAMA_8B = "configs/models/llama-3.1-8b.yaml"
# The default model of the serving-speed subcommands: Llama-shaped with a 32k vocabulary, random weights.
SMALL_32K = "configs/models/small-32k.yaml"
MODEL_HELP = "a model config (configs/models/*.yaml or a shipped name, e.g. tiny), 'demo' or a HF model directory"


def shared_options(*, model: str | None = None, model_help: str | None = None, mesh: str | None = None,
                   strategy: bool = False, dtype: str | None = None) -> argparse.ArgumentParser:
    """A parent parser (for argparse's `parents=`) holding the shared options a subcommand takes, with its
    defaults: --model, --mesh (with the multi-process flags) and --dtype where a default is given, --strategy where asked, and always --json."""
    parser = argparse.ArgumentParser(add_help=False)
    if model is not None:
        parser.add_argument("--model", default=model, help=model_help or MODEL_HELP)
    if mesh is not None:
        parser.add_argument("--mesh", default=mesh, help="DxM device mesh, e.g. 1x8 (emulated on a CPU-only host)")
        add_cluster_flags(parser)
    if strategy:
        parser.add_argument("--strategy", default="bdlora", choices=STRATEGIES)
    if dtype is not None:
        parser.add_argument("--dtype", default=dtype, choices=DTYPES)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def model_config(spec: str):
    """The ModelConfig --model names (checkpoint.resolve_model_config); a bad one exits naming the option."""
    from ..checkpoint import resolve_model_config

    try:
        return resolve_model_config(spec)
    except ValueError as e:
        raise SystemExit(f"--model {spec!r}: {e}") from None


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers, e.g. "8,16,32" (an argparse type)."""
    return [int(v) for v in text.split(",") if v]


def emit_report(report: dict, as_json: bool, printer: Callable[[dict], None]) -> None:
    """Print the report as one JSON object (--json) or with the subcommand's printer."""
    if as_json:
        print(json.dumps(report))
    else:
        printer(report)
