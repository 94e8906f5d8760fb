"""`python -m bdlora_jax.train --config FILE.yaml [field=value ...]`: train, checkpoint, and export PEFT adapters."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

import yaml

from ..distributed import add_cluster_flags, is_leader, start_from_args
from ..host_memory import keep_freed_memory, run_cpu_steps_synchronously


def load_config(path: Path | None, overrides: list[str]):
    """A TrainConfig from a YAML file plus key=value overrides (values parsed as YAML, e.g. rank=16, mesh=1x8),
    each value made its field's type (typed_value)."""
    from .config import TrainConfig

    data, sources = {}, {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise SystemExit(f"{path}: expected a mapping of training fields")
        data.update(loaded)
        sources.update(dict.fromkeys(loaded, str(path)))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r}: expected field=value")
        if key.split(".")[0] not in fields:
            raise SystemExit(f"override {item!r}: unknown field {key!r}; fields are {sorted(fields)}")
        parsed = yaml.safe_load(value) if value else ""
        if key.startswith("adapters."):
            data.setdefault("adapters", {})[key.split(".", 1)[1]] = str(parsed)
            sources.setdefault("adapters", f"override {item!r}")
        else:
            data[key] = parsed
            sources[key] = f"override {item!r}"
    unknown = set(data) - fields
    if unknown:
        raise SystemExit(f"{path}: unknown field(s) {sorted(unknown)}; fields are {sorted(fields)}")
    hints, typed = typing.get_type_hints(TrainConfig), {}
    for key, value in data.items():
        try:
            typed[key] = typed_value(key, value, hints[key])
        except TypeError as e:
            raise SystemExit(f"{sources[key]}: {e}") from None
    return TrainConfig(**typed)


def typed_value(name: str, value, kind):
    """value as the field's type: YAML 1.1 reads 3e-3 as a string and 2 as an int where a float is meant, and
    mesh 1x8 must stay a string; TypeError naming the field and value for a value that is not one of the type."""
    def refuse(expected: str):
        raise TypeError(f"{name}={value!r}: expected {expected}")

    if kind is bool:
        return value if isinstance(value, bool) else refuse("true or false")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            refuse("a number" if kind is float else "an integer")
        if isinstance(value, int):
            return kind(value)
        try:
            number = float(value)
        except ValueError:
            refuse("a number" if kind is float else "an integer")
        if kind is float:
            return number
        return int(number) if number.is_integer() else refuse("an integer")
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            refuse("a string")
        return str(value)
    if typing.get_origin(kind) is tuple:
        items = value if isinstance(value, list | tuple) else refuse("a list of names")
        return tuple(typed_value(name, item, str) for item in items)
    if typing.get_origin(kind) is dict:
        entries = value if isinstance(value, dict) else refuse("a mapping of NAME: path")
        return {str(k): typed_value(f"{name}.{k}", v, str) for k, v in entries.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    """Train as the config and overrides say (on every process of a multi-process job), export, print the result."""
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="python -m bdlora_jax.train", description=__doc__)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="field=value, e.g. rank=16 mesh=1x8 adapters.upper=data.jsonl")
    parser.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                        help="save and stop after step N of the run's schedule; a later run resumes there")
    add_cluster_flags(parser)
    args = parser.parse_args(argv)
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise SystemExit(f"--stop-at-step {args.stop_at_step}: expected a step number of at least 1")
    cfg = load_config(args.config, args.overrides)
    cluster = start_from_args(args, cfg.mesh)
    run_cpu_steps_synchronously()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from .trainer import Trainer

    trainer = Trainer(cfg)
    records = trainer.fit(steps=args.stop_at_step)
    exported = trainer.export()
    final = records[-1] if records else {}
    if not cluster.multi_process or is_leader():
        print(json.dumps({"final": final, "adapters": {k: str(v) for k, v in exported.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
