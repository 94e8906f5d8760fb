"""`bench ablate` runs the two-point smoke grid end to end, resumes where it stopped, and rejects bad configs."""

import contextlib
import io
import json
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from bdlora_jax.bench import ablate as bench_ablate
from bdlora_jax.bench.cli import main
from bdlora_jax.checkpoint import resolve_model_config
from bdlora_jax.comm import DecodeShape, communication_report
from bdlora_jax.configs import CONFIGS_DIR
from bdlora_jax.mesh import make_mesh
from bdlora_jax.sharding import make_plan

SMOKE = CONFIGS_DIR / "ablations" / "smoke.yaml"
pytestmark = [pytest.mark.xdist_group("ablate"), pytest.mark.slow]  # one worker runs the shared smoke grid once
AXES = ("strategy", "mesh", "rank", "adapters", "batch", "compressed")


def _main_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def _lines(path: Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    report = _main_json(["ablate", "--config", str(SMOKE), "--out", str(out), "--json"])
    return {"report": report, "dir": out / "smoke", "out": out, "config": yaml.safe_load(SMOKE.read_text())}


def test_results_hold_both_points_of_both_kinds(smoke):
    lines = _lines(smoke["dir"] / "results.jsonl")
    grid = smoke["config"]["grid"]
    expected = {(kind, strategy) for kind in ("decode", "serve") for strategy in grid["strategy"]}
    assert {(line["kind"], line["point"]["strategy"]) for line in lines} == expected
    assert len(lines) == len(expected) and smoke["report"]["ran"] == len(expected)
    common = {"kind", "point", "model", "settings", "run_id", "status", "tokens_per_s", "base_tokens_per_s",
              "ratio_to_base", "seconds", "base_seconds", "platform"}
    fields = {"decode": common | {"collectives", "base_collectives", "extra_collectives", "extra_per_layer", "layers"},
              "serve": common}
    for line in lines:
        assert set(line) == fields[line["kind"]] and line["status"] == "ok" and line["model"] == "demo"
        assert list(line["point"]) == list(AXES)
        assert {a: line["point"][a] for a in AXES if a != "strategy"} == {**{a: grid[a][0] for a in AXES[1:-1]},
                                                                          "compressed": False}
        assert line["tokens_per_s"] > 0 and line["base_tokens_per_s"] > 0
        assert line["ratio_to_base"] == pytest.approx(line["tokens_per_s"] / line["base_tokens_per_s"])
        assert line["tokens_per_s"] == pytest.approx(line["point"]["batch"] * (1 if line["kind"] == "decode" else
                                                     smoke["config"]["new_tokens"]) / line["seconds"])


def test_decode_collectives_equal_the_communication_report(smoke):
    settings = smoke["config"]
    config = resolve_model_config(settings["model"])
    decode = {line["point"]["strategy"]: line for line in _lines(smoke["dir"] / "results.jsonl")
              if line["kind"] == "decode"}
    p = decode["slora"]["point"]
    plan = make_plan(make_mesh(p["mesh"]), p["strategy"], config, p["rank"])
    shape = DecodeShape(batch=p["batch"], max_seq_len=settings["prompt_len"] + settings["new_tokens"],
                        max_loras=p["adapters"], rank=p["rank"], dtype=settings["dtype"])
    report = communication_report(config, plan, shape)
    assert decode["slora"]["collectives"] == report["with_lora"]
    assert decode["slora"]["base_collectives"] == report["base"]
    assert decode["slora"]["extra_collectives"] == report["extra"]
    # by hand (docs/design.md): slora adds 5 all-gathers and 2 all-reduces per layer, bdlora nothing, and
    # the base step is the same model on the same mesh for both
    assert decode["slora"]["extra_per_layer"] == {"all-gather": 5, "all-reduce": 2}
    assert decode["bdlora"]["extra_per_layer"] == {"all-reduce": 0}
    assert decode["bdlora"]["collectives"] == decode["bdlora"]["base_collectives"] == report["base"]


def test_table_lists_every_point_under_its_kind(smoke):
    table = (smoke["dir"] / "results.md").read_text()
    decode, serve = table.split("## end-to-end serving")
    assert "## decode step" in decode and "ratio to base" in table and "vs replicated" in table
    for strategy in smoke["config"]["grid"]["strategy"]:
        row = f"| {strategy} | 1x2 | 8 | 2 | 4 |"
        assert row in decode and row in serve


def test_plots_open_as_images(smoke):
    plots = [Path(f) for f in smoke["report"]["files"] if f.endswith(".png")]
    assert sorted(p.name for p in plots) == ["decode_extra_collectives.png", "decode_tokens_per_s.png",
                                             "serve_tokens_per_s.png"]
    for path in plots:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 100


def test_rerun_resumes_without_recomputing(smoke, monkeypatch):
    def fail(*args):
        raise AssertionError(f"point recomputed: {args[1:]}")

    monkeypatch.setattr(bench_ablate, "run_point", fail)
    before = (smoke["dir"] / "results.jsonl").read_text()
    (smoke["dir"] / "results.md").unlink()
    report = _main_json(["ablate", "--config", str(SMOKE), "--out", str(smoke["out"]), "--json"])
    assert (report["ran"], report["resumed"]) == (0, 4)
    assert (smoke["dir"] / "results.jsonl").read_text() == before
    assert (smoke["dir"] / "results.md").read_text() == report["table"]


def test_deleting_a_line_reruns_only_that_point(smoke, monkeypatch):
    path = smoke["dir"] / "results.jsonl"
    lines = _lines(path)
    dropped = next(line for line in lines if line["kind"] == "serve" and line["point"]["strategy"] == "bdlora")
    path.write_text("".join(json.dumps(line) + "\n" for line in lines if line is not dropped))
    calls = []

    def recording(config, kind, point):  # the measurement itself is covered above; this checks what is rerun
        calls.append((kind, point))
        return {key: dropped[key] for key in ("tokens_per_s", "base_tokens_per_s", "ratio_to_base", "seconds",
                                              "base_seconds", "platform")}

    monkeypatch.setattr(bench_ablate, "run_point", recording)
    report = _main_json(["ablate", "--config", str(SMOKE), "--out", str(smoke["out"]), "--json"])
    assert calls == [("serve", dropped["point"])]
    assert (report["ran"], report["resumed"]) == (1, 3)
    rerun = _lines(path)
    assert len(rerun) == 4 and rerun[:3] == [line for line in lines if line is not dropped]
    assert {**rerun[3], "run_id": dropped["run_id"]} == dropped


def test_invalid_combinations_are_recorded_as_skipped(tmp_path):
    config = tmp_path / "skips.yaml"
    config.write_text(yaml.safe_dump({"name": "skips", "model": "demo", "kinds": ["decode"],
                                      "grid": {"strategy": ["bdlora"], "mesh": ["1x2"], "rank": [3, 4],
                                               "adapters": [4], "batch": [2]}}))
    report = _main_json(["ablate", "--config", str(config), "--out", str(tmp_path), "--json"])
    reasons = [line["reason"] for line in _lines(tmp_path / "skips" / "results.jsonl")]
    assert reasons == [("rank 3 is not divisible by the model axis 2 (the adapters are BD-LoRA with one block "
                       "per device)"), "4 distinct adapters do not fit in a batch of 2"]
    assert "## skipped" in report["table"] and reasons[1] in report["table"]
    assert [f for f in report["files"] if f.endswith(".png")] == []


BASE = {"name": "x", "model": "demo", "kinds": ["decode"],
        "grid": {"strategy": ["bdlora"], "mesh": ["1x2"], "rank": [8], "adapters": [1], "batch": [2]}}


@pytest.mark.parametrize("change, field", [
    ({"grid": {**BASE["grid"], "compressed": ["yes"]}}, "grid.compressed: 'yes' is not true or false"),
    ({"grid": {**BASE["grid"], "adapter": [1]}}, "grid.adapter: unknown axis"),
    ({"grid": {**BASE["grid"], "rank": [8, 0]}}, "grid.rank: 0 is not a positive integer"),
    ({"grid": {**BASE["grid"], "mesh": ["8"]}}, "grid.mesh: mesh='8'"),
    ({"grid": {k: v for k, v in BASE["grid"].items() if k != "batch"}}, "grid.batch: expected a non-empty list"),
    ({"kinds": ["decode", "train"]}, "kinds: "),
    ({"model": "nope.yaml"}, "model: 'nope.yaml' is neither"),
    ({"name": "../up"}, "name: '../up' is not a directory name"),
    ({"dtype": "int8"}, "dtype: 'int8' is not one of"),
    ({"iterations": 3}, "iterations: unknown field"),
])
def test_config_errors_name_the_file_and_field(tmp_path, change, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}))
    with pytest.raises(bench_ablate.ConfigError) as err:
        bench_ablate.load_config(path)
    assert str(err.value).startswith(f"{path}: {field}")


def test_bad_config_on_the_command_line_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "grid": {**BASE["grid"], "compresed": [False]}}))
    with pytest.raises(SystemExit) as exit_:
        main(["ablate", "--config", str(path)])
    assert exit_.value.code == 2
    assert f"{path}: grid.compresed: unknown axis" in capsys.readouterr().err


def test_compressed_axis_serves_a_compressed_bank_with_no_extra_collectives(tmp_path):
    """bdlora with the block-diagonal compressed bank: the decode step compiles to the base model's collectives."""
    config = tmp_path / "compressed.yaml"
    config.write_text(yaml.safe_dump({**BASE, "name": "compressed", "grid": {**BASE["grid"], "compressed": [True]},
                                      "iters": 2, "warmup": 1}))
    report = _main_json(["ablate", "--config", str(config), "--out", str(tmp_path), "--json"])
    (line,) = _lines(tmp_path / "compressed" / "results.jsonl")
    assert report["ran"] == 1 and line["status"] == "ok" and line["point"]["compressed"] is True
    assert line["collectives"] == line["base_collectives"] and line["tokens_per_s"] > 0
