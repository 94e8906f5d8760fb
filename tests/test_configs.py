"""Shipped configs (models, device profiles, ablations) resolve from any working directory, by path or by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdlora_jax.bench.ablate import ConfigError, load_config
from bdlora_jax.checkpoint import CheckpointError, resolve_model_config
from bdlora_jax.configs import CONFIGS_DIR, KINDS, ConfigNotFound, find_config, shipped_names
from bdlora_jax.cost_model import load_device_profile

ROOT = Path(__file__).resolve().parents[1]


def test_every_kind_ships_its_configs():
    assert shipped_names("models") == ["llama-3.1-70b", "llama-3.1-8b", "small-32k", "tiny"]
    assert shipped_names("devices") == ["a100-80gb-nvlink", "h100-sxm"]
    assert shipped_names("ablations") == ["smoke", "strategies"]
    assert set(KINDS) == {p.name for p in CONFIGS_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}


@pytest.mark.parametrize("name", ["llama-3.1-70b", "llama-3.1-8b", "small-32k", "tiny"])
def test_shipped_model_configs_load_by_name(name):
    assert resolve_model_config(name).name == name


@pytest.mark.parametrize("name", ["a100-80gb-nvlink", "h100-sxm"])
def test_shipped_device_profiles_load_by_name(name):
    assert load_device_profile(find_config(name, "devices")).name


@pytest.mark.parametrize("name", ["smoke", "strategies"])
def test_shipped_ablations_load_by_name(name):
    assert load_config(name).name == name


@pytest.mark.parametrize("spec", ["configs/models/tiny.yaml", "tiny", "tiny.yaml", "configs/models/tiny"])
def test_docs_paths_and_bare_names_find_the_shipped_config_from_any_directory(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config(spec, "models") == CONFIGS_DIR / "models" / "tiny.yaml"


def test_a_path_that_exists_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "configs" / "models" / "tiny.yaml"
    local.parent.mkdir(parents=True)
    local.write_text((CONFIGS_DIR / "models" / "tiny.yaml").read_text().replace("name: tiny", "name: my-tiny"))
    assert find_config("configs/models/tiny.yaml", "models") == Path("configs/models/tiny.yaml")
    assert resolve_model_config("configs/models/tiny.yaml").name == "my-tiny"
    assert resolve_model_config(str(local)).name == "my-tiny"


@pytest.mark.parametrize("spec", ["configs/models/nope.yaml", "nope", "elsewhere/tiny.yaml", "/nowhere/tiny.yaml"])
def test_a_missing_config_lists_the_shipped_names(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigNotFound, match="llama-3.1-70b, llama-3.1-8b, small-32k, tiny") as err:
        find_config(spec, "models")
    assert repr(spec) in str(err.value)
    with pytest.raises(CheckpointError, match=f"model {spec!r}: .*small-32k, tiny"):
        resolve_model_config(spec)


def test_a_missing_ablation_config_is_a_config_error_listing_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'configs/ablations/nope.yaml'.*smoke, strategies"):
        load_config("configs/ablations/nope.yaml")


def test_an_ablation_may_name_a_shipped_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "grid.yaml"
    path.write_text("name: grid\nmodel: configs/models/tiny.yaml\nkinds: [decode]\n"
                    "grid: {strategy: [bdlora], mesh: [1x2], rank: [8], adapters: [1], batch: [2]}\n")
    assert load_config(path).model == "configs/models/tiny.yaml"


def test_bench_cost_runs_from_another_directory_with_default_device_paths(tmp_path):
    """The docs' configs/models path and the default configs/devices paths resolve outside the repository."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, "-m", "bdlora_jax.bench", "cost", "--model", "configs/models/tiny.yaml", "--ranks", "8",
         "--multipliers", "2", "--batch", "4", "--seq-len", "64", "--max-loras", "2", "--json"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=env,
    )
    report = json.loads(out.stdout)
    assert report["setup"]["model"] == "tiny"
    assert set(report["devices"]) == {"A100-80GB-SXM4 (NVLink)", "H100-SXM5-80GB (NVLink)"}
    assert [(s["strategy"], s["rank"]) for s in report["steps"]] == [("slora", 8), ("bdlora", 16)]
