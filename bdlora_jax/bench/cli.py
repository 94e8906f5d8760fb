"""The `python -m bdlora_jax.bench <subcommand>` command line: the registry of subcommands, the parser built from
it, and main (emulated CPU devices or the multi-process job, logging, the report printed as a table or as one JSON
object by process 0)."""

from __future__ import annotations

import argparse
import logging

from ..distributed import is_leader, start_from_args
from . import ablate, comm, compress, cost, demo_accuracy, kernel, load, lower, serve, step, train
from .common import emit_report

DESCRIPTION = ("Measurements printed side by side (one JSON object with --json). `SUBCOMMAND --help` describes "
               "each subcommand and its options.")

# Every subcommand, in the order `--help` lists them. A subcommand is one module of this package with NAME,
# HELP, OPTIONS (its shared options: common.shared_options), add_arguments(parser), run(args) -> dict and
# print_report(report); adding one is writing that module and listing it here.
SUBCOMMANDS = (comm, serve, load, step, demo_accuracy, kernel, lower, ablate, compress, cost, train)


def build_parser() -> argparse.ArgumentParser:
    """The bench's parser: one subparser per registered subcommand, its shared options first."""
    parser = argparse.ArgumentParser(prog="python -m bdlora_jax.bench", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                                            parents=[module.OPTIONS],
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the subcommand and print its report; returns the exit status."""
    args = build_parser().parse_args(argv)
    cluster = start_from_args(args, getattr(args, "mesh", "1x1"))
    logging.basicConfig(level=logging.INFO if not args.json else logging.WARNING, format="%(message)s")
    module = {m.NAME: m for m in SUBCOMMANDS}[args.command]
    report = module.run(args)
    if not cluster.multi_process or is_leader():  # every process measures; process 0 reports
        emit_report(report, args.json, module.print_report)
    return 0
