"""`bench ablate`: sweep strategy x mesh x rank x distinct adapters x batch from a YAML grid, resumably.

Each grid point runs each configured kind of measurement:
- `decode`: the jitted decode step (one token per row, cache donated) of the model on that mesh with that
  strategy, rank and number of distinct adapters in the batch. Its collectives are counted in the compiled
  HLO (comm.communication_report), and it is timed on the mesh (median of `iters` calls after `warmup`),
  interleaved with the same step without adapters, so `ratio_to_base` is measured side by side.
- `serve`: offline generation throughput through the Engine (bench serve), with its base-only ratio.
The `compressed` axis (default false) takes the adapters from a random compressed bank instead of the pool
(one cluster, rank `rank`; under bdlora the block-diagonal variant with one block per device).
Every finished point is appended to <out>/<name>/results.jsonl at once; a re-run skips the points already
there (matched by kind and axis values) and rebuilds results.md and the PNG plots from all lines.
Invalid combinations (e.g. a rank the model axis cannot divide) are recorded as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import DTYPES, STRATEGIES, ModelConfig
from ..configs import SUFFIXES, ConfigNotFound, find_config, shipped_names
from ..demo import is_demo_model
from ..mesh import parse_mesh
from . import serve as serve_bench
from .common import shared_options

NAME = "ablate"
HELP = "sweep a grid of strategies, meshes, ranks, adapters"
OPTIONS = shared_options()
KINDS = ("decode", "serve")
COLLECTIVE_KINDS = ("all-gather", "all-reduce")


class ConfigError(ValueError):
    """An ablation config that cannot be run; the message names the file and the field."""


def _strategy(value: Any) -> str:
    if value not in STRATEGIES:
        raise ValueError(f"{value!r} is not one of {STRATEGIES}")
    return value


def _mesh(value: Any) -> str:
    parse_mesh(value)
    return str(value)


def _dtype(value: Any) -> str:
    if value not in DTYPES:
        raise ValueError(f"{value!r} is not one of {DTYPES}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return value


# The grid's axes and the check of one value of each. A new axis gets an entry here and its handling in run_point.
AXES: dict[str, Callable[[Any], Any]] = {
    "strategy": _strategy,
    "mesh": _mesh,
    "rank": _positive_int,
    "adapters": _positive_int,
    "batch": _positive_int,
    "compressed": _boolean,
}
# Axes a config may leave out, and the values they then take.
AXIS_DEFAULTS: dict[str, list] = {"compressed": [False]}

# Fixed settings of every point: name -> (default, check).
SETTINGS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "prompt_len": (16, _positive_int),
    "new_tokens": (16, _positive_int),
    "iters": (10, _positive_int),
    "warmup": (2, _positive_int),
    "repeats": (3, _positive_int),
    "dtype": ("float32", _dtype),
}


@dataclass(frozen=True)
class AblationConfig:
    """A validated ablation: which model, which measurements, the grid's axis values and the fixed settings."""

    path: Path
    name: str
    model: str
    kinds: tuple[str, ...]
    grid: dict[str, tuple]
    settings: dict[str, Any]

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the axis values, as {axis: value}, in the order the axes are listed in AXES."""
        return [dict(zip(AXES, values)) for values in itertools.product(*(self.grid[a] for a in AXES))]

    @property
    def largest_mesh(self) -> str:
        """The grid's mesh with the most devices (how many devices to emulate on a CPU host)."""
        return max(self.grid["mesh"], key=lambda m: parse_mesh(m)[0] * parse_mesh(m)[1])


def _is_model_config(model: Any) -> bool:
    """Whether `model` names a model config: a *.yaml file, or a shipped one by name or configs/models path."""
    try:
        return isinstance(model, str) and find_config(model, "models").suffix in SUFFIXES
    except ConfigNotFound:
        return False


def load_config(path: str | Path) -> AblationConfig:
    """Read and validate an ablation config (a file, or a shipped one by name or configs/ablations/NAME.yaml path);
    every error names the file and the field."""
    try:
        path = find_config(path, "ablations")
    except ConfigNotFound as err:
        raise ConfigError(str(err)) from err

    def fail(field: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {field}: {problem}")

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the ablation config ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with name, model, kinds and grid")
    unknown = set(data) - {"name", "model", "kinds", "grid", *SETTINGS}
    if unknown:
        raise fail(min(unknown), f"unknown field; expected name, model, kinds, grid, {', '.join(SETTINGS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise fail("name", f"{name!r} is not a directory name (letters, digits, '-', '_', '.')")
    model = data.get("model")
    if not is_demo_model(model) and not _is_model_config(model):
        raise fail("model", f"{model!r} is neither 'demo' nor a configs/models/*.yaml file or the name of a shipped "
                            f"model config ({', '.join(shipped_names('models'))})")
    kinds = data.get("kinds")
    if not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) < len(kinds):
        raise fail("kinds", f"{kinds!r} is not a non-empty list of distinct values from {KINDS}")
    grid = data.get("grid")
    if not isinstance(grid, dict):
        raise fail("grid", f"expected a mapping of axis name to a list of values ({', '.join(AXES)})")
    for axis in grid:
        if axis not in AXES:
            raise fail(f"grid.{axis}", f"unknown axis; expected one of {', '.join(AXES)}")
    values = {}
    for axis, check in AXES.items():
        listed = grid.get(axis, AXIS_DEFAULTS.get(axis))
        if not isinstance(listed, list) or not listed:
            raise fail(f"grid.{axis}", f"expected a non-empty list of values, got {listed!r}")
        try:
            values[axis] = tuple(check(v) for v in listed)
        except ValueError as err:
            raise fail(f"grid.{axis}", str(err)) from err
        if len(set(values[axis])) < len(values[axis]):
            raise fail(f"grid.{axis}", f"{listed!r} lists a value twice")
    settings = {}
    for field, (default, check) in SETTINGS.items():
        try:
            settings[field] = check(data.get(field, default))
        except ValueError as err:
            raise fail(field, str(err)) from err
    return AblationConfig(path, name, model, tuple(kinds), values, settings)


def skip_reason(model_config: ModelConfig, point: dict[str, Any]) -> str | None:
    """Why a grid point cannot run (None if it can): shapes the mesh does not divide, or more adapters than rows."""
    from ..mesh import make_mesh
    from ..sharding import make_plan

    data, model = parse_mesh(point["mesh"])
    if point["rank"] % model:
        return (f"rank {point['rank']} is not divisible by the model axis {model} (the adapters are BD-LoRA with "
                f"one block per device)")
    if point["batch"] % data:
        return f"batch {point['batch']} is not divisible by the data axis {data}"
    if point["adapters"] > point["batch"]:
        return f"{point['adapters']} distinct adapters do not fit in a batch of {point['batch']}"
    if point["compressed"] and point["strategy"] == "bdlora" and model_config.num_kv_heads % model:
        return f"the block-diagonal compressed bank needs the model axis {model} to divide the k/v outputs"
    mesh = make_mesh(point["mesh"])
    try:
        make_plan(mesh, point["strategy"], model_config, point["rank"])
    except ValueError as err:
        return str(err)
    return None


def _serve_args(config: AblationConfig, point: dict[str, Any]) -> argparse.Namespace:
    """The `bench serve` arguments of one grid point."""
    s = config.settings
    return argparse.Namespace(model=config.model, mesh=point["mesh"], strategy=point["strategy"], batch=point["batch"],
                              prompt_len=s["prompt_len"], new_tokens=s["new_tokens"], rank=point["rank"],
                              adapters=str(point["adapters"]), repeats=s["repeats"], dtype=s["dtype"], json=True,
                              kv_cache="contiguous", page_size=16, max_num_batched_tokens=256)


def _compressed_engine(config: AblationConfig, point: dict[str, Any], directory: Path):
    """An engine serving `adapters` random compressed adapters (rank `rank`, one cluster; under bdlora the
    block-diagonal variant with one block per device), and no pool adapters."""
    from ..checkpoint import resolve_model_config
    from ..compress.synthetic import random_compressed_bank

    model_config = resolve_model_config(config.model)
    blocks = parse_mesh(point["mesh"])[1] if point["strategy"] == "bdlora" else 1
    random_compressed_bank(model_config, point["adapters"], point["rank"], blocks=blocks, prefix="c").save(directory)
    return serve_bench._engine(_serve_args(config, point), max_loras=1, compressed_bank=directory)


def _decode_point(config: AblationConfig, point: dict[str, Any]) -> dict:
    """Collectives and tokens/s of one decode step with `adapters` distinct adapters, beside the base step.

    The adapters are pool adapters (BD-LoRA with one block per device, densified under replicated and slora) or,
    with `compressed`, the adapters of a compressed bank. The step is comm.compile_decode_step's (forward on one
    token per row, cache donated), compiled here for the engine's arrays; its HLO is counted with
    comm.count_collectives and the same executable is timed.
    """
    import tempfile
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..adapters.synthetic import random_adapter
    from ..comm import count_collectives
    from ..engine.generator import adapter_batch
    from ..model.llama import forward, init_cache

    s, batch, n = config.settings, point["batch"], point["adapters"]
    names = [f"{'c' if point['compressed'] else 'a'}-{i % n}" for i in range(batch)]
    if point["compressed"]:
        with tempfile.TemporaryDirectory() as tmp:
            engine = _compressed_engine(config, point, Path(tmp) / "bank")
    else:
        engine = serve_bench._engine(_serve_args(config, point), max_loras=n)
        for i in range(n):
            engine.add_adapter(f"a-{i}", random_adapter(engine.model_config, f"a-{i}", rank=point["rank"],
                                                        nblocks=engine.plan.model_size, seed=i))
    plan, model_config = engine.plan, engine.model_config
    slots, clusters, sigma_ids = (jax.device_put(np.asarray(ids, np.int32), plan.sharding(("batch",)))
                                  for ids in engine.resolve(names))
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, model_config.vocab_size, (batch, 1)).astype(np.int32),
                            plan.sharding(("batch", "seq")))
    start = jax.device_put(np.full((batch,), s["prompt_len"], np.int32), plan.sharding(("batch",)))
    variants = {"base": None,
                "lora": adapter_batch(engine.pool.bank, engine.compressed_arrays, slots, clusters, sigma_ids)}
    caches = {label: init_cache(model_config, plan, batch, s["prompt_len"] + s["new_tokens"], jnp.dtype(s["dtype"]))
              for label in variants}
    step = jax.jit(partial(forward, engine.graphdef), donate_argnums=(3,))
    compiled = {label: step.lower(engine.state, tokens, start, caches[label], adapters).compile()
                for label, adapters in variants.items()}
    counts = {label: count_collectives(c.as_text()) for label, c in compiled.items()}

    def timed(label: str) -> float:
        begin = time.perf_counter()
        logits, caches[label] = compiled[label](engine.state, tokens, start, caches[label], variants[label])
        logits.block_until_ready()
        return time.perf_counter() - begin

    for _ in range(s["warmup"]):
        for label in variants:
            timed(label)
    samples: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(s["iters"]):  # interleaved, so drift in machine load hits both alike
        for label in variants:
            samples[label].append(timed(label))
    seconds = {label: statistics.median(times) for label, times in samples.items()}
    zero = {"count": 0, "bytes": 0}
    extra = {k: {f: counts["lora"].get(k, zero)[f] - counts["base"].get(k, zero)[f] for f in zero}
             for k in sorted(set(counts["base"]) | set(counts["lora"]))}
    layers = model_config.num_layers
    return {
        "tokens_per_s": batch / seconds["lora"], "base_tokens_per_s": batch / seconds["base"],
        "ratio_to_base": seconds["base"] / seconds["lora"], "seconds": seconds["lora"], "base_seconds": seconds["base"],
        "collectives": counts["lora"], "base_collectives": counts["base"], "extra_collectives": extra,
        "extra_per_layer": {k: v["count"] / layers for k, v in extra.items()}, "layers": layers,
        "platform": plan.mesh.devices.flat[0].platform,
    }


def _serve_point(config: AblationConfig, point: dict[str, Any]) -> dict:
    """End-to-end offline generation throughput with `adapters` distinct adapters (bench serve), from the pool
    or, with `compressed`, from a compressed bank."""
    label = f"{point['adapters']} adapters"
    if point["compressed"]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            engine = _compressed_engine(config, point, Path(tmp) / "bank")
        s, n, batch = config.settings, point["adapters"], point["batch"]
        configurations = {"base only": [None] * batch, label: [f"c-{i % n}" for i in range(batch)]}
        results = serve_bench.throughput(engine, configurations, s["prompt_len"], s["new_tokens"], s["repeats"])
        platform = engine.plan.mesh.devices.flat[0].platform
    else:
        report = serve_bench.run(_serve_args(config, point))
        results, platform = report["results"], report["setup"]["platform"]
    entry, base = results[label], results["base only"]
    return {"tokens_per_s": entry["tokens_per_s"], "base_tokens_per_s": base["tokens_per_s"],
            "ratio_to_base": entry["ratio_to_base"], "seconds": entry["seconds"], "base_seconds": base["seconds"],
            "platform": platform}


def run_point(config: AblationConfig, kind: str, point: dict[str, Any]) -> dict:
    """Measure one kind at one grid point; every axis of the point is handled here."""
    return {"decode": _decode_point, "serve": _serve_point}[kind](config, point)


def point_key(kind: str, point: dict[str, Any]) -> tuple:
    """What identifies a result line for resuming: the kind and the value of every axis."""
    return (kind, *(point.get(axis) for axis in AXES))


def read_results(path: Path, config: AblationConfig) -> list[dict]:
    """The result lines already written; a line made with other fixed settings is an error (stale results)."""
    if not path.exists():
        return []
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg}); delete that line to resume") from err
        if line.get("settings") != config.settings or line.get("model") != config.model:
            raise ValueError(f"{path}:{number}: made with model {line.get('model')!r} and settings "
                             f"{line.get('settings')}, but {config.path} now says {config.model!r} and "
                             f"{config.settings}; use another name or --out, or delete the file")
        lines.append(line)
    return lines


def _ordered(config: AblationConfig, lines: list[dict]) -> list[dict]:
    """Lines in grid order (points no longer in the grid last, as written)."""
    order = {point_key(kind, point): i for i, (point, kind) in enumerate(itertools.product(config.points(),
                                                                                            config.kinds))}
    return sorted(lines, key=lambda line: order.get(point_key(line["kind"], line["point"]), len(order)))


def _vs_replicated(line: dict, lines: list[dict]) -> float | None:
    """Tokens/s relative to the replicated point at the same grid position, if it ran in the same invocation."""
    for other in lines:
        if (other["kind"] == line["kind"] and other["status"] == "ok" and other["run_id"] == line["run_id"]
                and other["point"] == {**line["point"], "strategy": "replicated"}):
            return line["tokens_per_s"] / other["tokens_per_s"]
    return None


def markdown_table(config: AblationConfig, lines: list[dict]) -> str:
    """results.md: one table per kind of measurement, then the skipped points with their reasons."""
    lines = _ordered(config, lines)
    s = config.settings
    out = [f"# Ablation `{config.name}` ({config.path}), model `{config.model}`", "",
           (f"prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens, {s['dtype']}. `ratio to base`: tokens/s "
           "with the point's adapters ÷ tokens/s of the base model on the same mesh, timed interleaved within the "
           "point. `vs replicated`: tokens/s ÷ the `replicated` point with the same mesh, rank, adapters and batch, "
           "measured in the same invocation (– where it was not)."), ""]
    axes = " | ".join(AXES)
    ok = [line for line in lines if line["status"] == "ok"]
    for kind in KINDS:
        rows = [line for line in ok if line["kind"] == kind]
        if not rows:
            continue
        if kind == "decode":
            collectives = sorted({k for line in rows for k in line["collectives"]})
            out += ["## decode step", "",
                    (f"Batch tokens per second of one decode step (median of {s['iters']} after {s['warmup']} "
                    "warm-up), and the collectives the adapters add to the compiled step (per layer; bytes per "
                    "step, all kinds)."), ""]
            extra_heads = "".join(f" extra {k}/layer |" for k in collectives)
            out += [(f"| {axes} | tokens/s | base tokens/s | ratio to base | vs replicated |{extra_heads} "
                    "extra bytes/step |"), "|" + "---|" * (len(AXES) + 5 + len(collectives))]
        else:
            out += ["## end-to-end serving", "",
                    (f"Offline generation through the Engine: generated tokens per second of the whole batch (median "
                    f"of {s['repeats']} runs); base = requests without an adapter on the same engine."), "",
                    f"| {axes} | tokens/s | base tokens/s | ratio to base | vs replicated |",
                    "|" + "---|" * (len(AXES) + 4)]
        for line in rows:
            vs = _vs_replicated(line, lines)
            cells = [str(line["point"][a]) for a in AXES] + [
                f"{line['tokens_per_s']:.1f}", f"{line['base_tokens_per_s']:.1f}", f"{line['ratio_to_base']:.3f}",
                "–" if vs is None else f"{vs:.3f}"]
            if kind == "decode":
                cells += [f"{line['extra_per_layer'].get(k, 0):g}" for k in collectives]
                cells.append(str(sum(v["bytes"] for v in line["extra_collectives"].values())))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    skipped = [line for line in lines if line["status"] == "skipped"]
    if skipped:
        out += ["## skipped", "", f"| kind | {axes} | reason |", "|" + "---|" * (len(AXES) + 2)]
        out += [f"| {line['kind']} | " + " | ".join(str(line["point"][a]) for a in AXES) + f" | {line['reason']} |"
                for line in skipped]
        out.append("")
    return "\n".join(out)


def plot_results(lines: list[dict], out_dir: Path) -> list[Path]:
    """PNG plots: tokens/s against distinct adapters per strategy (one panel per mesh, rank and batch) for each
    kind, and the extra collectives per layer of each strategy's decode step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [line for line in lines if line["status"] == "ok"]
    written = []
    for kind in KINDS:
        rows = [line for line in ok if line["kind"] == kind]
        if not rows:
            continue
        panels = sorted({(r["point"]["mesh"], r["point"]["rank"], r["point"]["batch"]) for r in rows})
        cols = min(3, len(panels))
        fig, axs = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.5 * cols, 3.5 * -(-len(panels) // cols)),
                                squeeze=False)
        for ax, (mesh, rank, batch) in zip(axs.flat, panels):
            for strategy, compressed in itertools.product(STRATEGIES, (False, True)):
                points = sorted((r["point"]["adapters"], r["tokens_per_s"]) for r in rows
                                if (r["point"]["mesh"], r["point"]["rank"], r["point"]["batch"]) == (mesh, rank, batch)
                                and (r["point"]["strategy"], r["point"]["compressed"]) == (strategy, compressed))
                if points:
                    ax.plot(*zip(*points), marker="o", linestyle="--" if compressed else "-",
                            label=f"{strategy}, compressed" if compressed else strategy)
            ax.set_xticks(sorted({r["point"]["adapters"] for r in rows}))
            ax.set(title=f"mesh {mesh}, rank {rank}, batch {batch}", xlabel="distinct adapters in the batch",
                   ylabel="tokens/s")
            ax.set_ylim(bottom=0)
            ax.legend()
        for ax in list(axs.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{kind}: tokens/s against distinct adapters")
        fig.tight_layout()
        written.append(out_dir / f"{kind}_tokens_per_s.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    decode = [line for line in ok if line["kind"] == "decode"]
    if decode:
        groups: dict[str, dict[str, float]] = {}
        for line in decode:
            p = line["point"]
            group = groups.setdefault(f"{p['strategy']}{' (c)' if p['compressed'] else ''}\n{p['mesh']} r{p['rank']}",
                                      {})
            for k, v in line["extra_per_layer"].items():
                group[k] = max(group.get(k, 0.0), v)
        collectives = sorted({k for group in groups.values() for k in group})
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) + 2), 4))
        width = 0.8 / max(1, len(collectives))
        for j, k in enumerate(collectives):
            ax.bar([i + j * width for i in range(len(groups))], [g.get(k, 0.0) for g in groups.values()], width,
                   label=k)
        ax.set_xticks([i + width * (len(collectives) - 1) / 2 for i in range(len(groups))], list(groups))
        ax.set(ylabel="extra collectives per layer",
               title="collectives the adapters add to the decode step\n(max over batch and adapters; (c): compressed)")
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "decode_extra_collectives.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ablate` subcommand's options: the config file and the results root."""
    parser.add_argument("--config", required=True, action=_ConfigAction,
                        help="configs/ablations/*.yaml, or the name of a shipped one")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root; writes <out>/<name>/")


class _ConfigAction(argparse.Action):
    """Load the config while parsing, so the bench's main can emulate enough CPU devices for its largest mesh."""

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            config = load_config(value)
        except ConfigError as err:
            parser.error(str(err))
        setattr(namespace, self.dest, config)
        namespace.mesh = config.largest_mesh


def run(args: argparse.Namespace) -> dict:
    """Run every grid point not yet in results.jsonl, then write results.md and the plots from all lines."""
    from tqdm import tqdm

    from ..checkpoint import resolve_model_config

    config: AblationConfig = args.config
    out_dir = args.out / config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    lines = read_results(results_path, config)
    done = {point_key(line["kind"], line["point"]) for line in lines}
    work = [(kind, point) for point in config.points() for kind in config.kinds]
    pending = [(kind, point) for kind, point in work if point_key(kind, point) not in done]
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    model_config = resolve_model_config(config.model)
    reasons: dict[tuple, str | None] = {}
    with tqdm(total=len(work), initial=len(work) - len(pending), desc=config.name, unit="measurement",
              disable=args.json) as progress:
        for kind, point in pending:
            progress.set_postfix_str(f"{kind} " + " ".join(f"{a}={v}" for a, v in point.items()))
            key = tuple(point.values())
            if key not in reasons:
                reasons[key] = skip_reason(model_config, point)
            line = {"kind": kind, "point": point, "model": config.model, "settings": config.settings, "run_id": run_id}
            if reasons[key]:
                line.update(status="skipped", reason=reasons[key])
            else:
                line.update(status="ok", **run_point(config, kind, point))
            with results_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
            lines.append(line)
            progress.update()
    table = markdown_table(config, lines)
    (out_dir / "results.md").write_text(table)
    plots = plot_results(lines, out_dir)
    return {"name": config.name, "config": str(config.path), "out_dir": str(out_dir), "ran": len(pending),
            "resumed": len(work) - len(pending), "results": lines, "table": table,
            "files": [str(results_path), str(out_dir / "results.md"), *map(str, plots)]}


def print_report(report: dict) -> None:
    """Print the markdown table and where the results went."""
    print(report["table"])
    print(f"{report['ran']} measurements run, {report['resumed']} already in {report['out_dir']}/results.jsonl; wrote:")
    for path in report["files"]:
        print(f"  {path}")
