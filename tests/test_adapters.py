"""Adapter loading, validation, round trips and the adapter pool, end to end through the Engine.

Every refusal test checks the error type, that the message names the offending file / tensor / field /
value, and that the engine afterwards still serves what it had: a previously registered adapter still
matches the reference logits, the bad name is not registered, the pool is untouched, and re-adding a fixed
adapter under the same name works.

Engines are module-scoped and every forward uses the same batch shape (the three reference prompts), so
each engine compiles its forward once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bdlora_jax import Engine
from bdlora_jax.checkpoint import load_model_config
from bdlora_jax.errors import AdapterError, PoolFullError
from bdlora_jax.lora.peft_io import read_adapter, write_adapter

FIXTURE_ADAPTERS = ("lora_r8", "lora_rs_r4_qv", "bdlora_nb2_r8", "bdlora_nb4_r8")
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ATOL = 1e-4
GOOD = "good"  # lora_rs_r4_qv, registered before every refusal


def key(layer: int, module: str, factor: str) -> str:
    parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{factor}.weight"


# ---------------------------------------------------------------------------------------------- helpers


def make_engine(hf_dir: Path, **kwargs) -> Engine:
    opts = dict(mesh="1x1", strategy="bdlora", max_loras=4, max_lora_rank=8, dtype="float32")
    opts.update(kwargs)
    return Engine.from_pretrained(hf_dir / "model", **opts)


def prompts(reference) -> list[list[int]]:
    return [list(map(int, p)) for p in reference["prompts"]]


def assert_serves(eng: Engine, name: str | None, reference, ref_adapter: str | None) -> None:
    """All three reference prompts under `name` (one batch) match logits_<ref_adapter> within ATOL."""
    out = np.stack(eng.batch_logits(prompts(reference), [name] * 3))
    expected = reference["logits_base" if ref_adapter is None else f"logits_{ref_adapter}"]
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0, err_msg=f"adapter {name!r} ({ref_adapter})")


def copy_adapter(hf_dir: Path, fixture: str, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(hf_dir / "adapters" / fixture, dest)
    return dest


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config, indent=2))


def edit_tensors(path: Path, fn) -> None:
    tensors = load_file(str(path / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def refuse_then_recover(eng: Engine, reference, hf_dir: Path, bad_path: Path, name: str, fixture: str,
                        error=AdapterError, must_mention=()) -> str:
    """add_adapter(name, bad_path) raises `error` naming every string in must_mention; the engine is unchanged;
    then bad_path is restored from `fixture`, re-added under the same name and served exactly. Returns the message."""
    assert GOOD in eng.adapters
    before = (eng.adapters, dict(eng.pool.resident), eng.pool.loads, eng.pool.evictions)
    with pytest.raises(error) as info:
        eng.add_adapter(name, bad_path)
    message = str(info.value)
    for fragment in must_mention:
        assert str(fragment) in message, f"{fragment!r} not in error message: {message}"
    # nothing changed, nothing half-loaded
    assert name not in eng.adapters
    assert (eng.adapters, dict(eng.pool.resident), eng.pool.loads, eng.pool.evictions) == before
    assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")
    with pytest.raises(KeyError):
        eng.logits(prompts(reference)[0], adapter=name)
    # a fixed adapter under the same name (and the same path) registers and serves exactly
    copy_adapter(hf_dir, fixture, bad_path)
    eng.add_adapter(name, bad_path)
    assert name in eng.adapters
    assert_serves(eng, name, reference, fixture)
    assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")
    eng.remove_adapter(name)
    assert name not in eng.adapters
    return message


# ---------------------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def eng(hf_dir, reference):
    """1x1 bdlora engine, max_loras=4, max_lora_rank=8, with GOOD registered and checked."""
    engine = make_engine(hf_dir)
    engine.add_adapter(GOOD, hf_dir / "adapters" / "lora_rs_r4_qv")
    assert_serves(engine, GOOD, reference, "lora_rs_r4_qv")
    return engine


@pytest.fixture(scope="module")
def model_config(hf_dir):
    return load_model_config(hf_dir / "model")


def test_adapter_error_is_value_error():
    assert issubclass(AdapterError, ValueError)


def test_base_and_every_fixture_adapter_match_reference(eng, hf_dir, reference):
    assert_serves(eng, None, reference, None)
    for fixture in FIXTURE_ADAPTERS:
        eng.add_adapter(f"fx_{fixture}", hf_dir / "adapters" / fixture)
        assert_serves(eng, f"fx_{fixture}", reference, fixture)
    # one batch, one different adapter (or none) per row
    out = eng.batch_logits(prompts(reference), ["fx_lora_r8", None, "fx_bdlora_nb2_r8"])
    for row, ref in enumerate(("lora_r8", "base", "bdlora_nb2_r8")):
        np.testing.assert_allclose(out[row], reference[f"logits_{ref}"][row], atol=ATOL, rtol=0)
    for fixture in FIXTURE_ADAPTERS:
        eng.remove_adapter(f"fx_{fixture}")
    assert eng.adapters == [GOOD]


# ------------------------------------------------------------------- 1. missing / unreadable files


def test_missing_directory(eng, hf_dir, reference, tmp_path):
    bad = tmp_path / "does_not_exist"
    msg = refuse_then_recover(eng, reference, hf_dir, bad, "missing_dir", "lora_r8", must_mention=[bad])
    assert "does not exist" in msg


def test_missing_adapter_config(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "no_config")
    (bad / CONFIG).unlink()
    refuse_then_recover(eng, reference, hf_dir, bad, "no_config", "lora_r8", must_mention=[bad / CONFIG, "missing"])


def test_missing_safetensors(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "no_weights")
    (bad / WEIGHTS).unlink()
    refuse_then_recover(eng, reference, hf_dir, bad, "no_weights", "lora_r8", must_mention=[bad / WEIGHTS, "missing"])


def test_only_bin_weights(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "bin_only")
    (bad / WEIGHTS).rename(bad / "adapter_model.bin")
    refuse_then_recover(eng, reference, hf_dir, bad, "bin_only", "lora_r8",
                        must_mention=[bad / WEIGHTS, "adapter_model.bin"])


def test_config_not_json(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "bad_json")
    (bad / CONFIG).write_text('{"r": 8, "lora_alpha": 16,,, not json')
    refuse_then_recover(eng, reference, hf_dir, bad, "bad_json", "lora_r8",
                        must_mention=[bad / CONFIG, "not valid JSON"])


def test_corrupt_safetensors(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "corrupt")
    (bad / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    refuse_then_recover(eng, reference, hf_dir, bad, "corrupt", "lora_r8", must_mention=[bad / WEIGHTS])


# ----------------------------------------------------------------------------- 2. unknown modules


def test_unknown_target_module_in_config(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_rs_r4_qv", tmp_path / "w1")
    edit_config(bad, target_modules=["q_proj", "w1"])
    refuse_then_recover(eng, reference, hf_dir, bad, "w1", "lora_rs_r4_qv",
                        must_mention=[bad / CONFIG, "w1", "target module"])


def test_unknown_module_in_tensors(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "qq")
    old = key(0, "q_proj", "A")
    new = "base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight"
    edit_tensors(bad, lambda t: t.__setitem__(new, t.pop(old)))
    refuse_then_recover(eng, reference, hf_dir, bad, "qq", "lora_r8", must_mention=[bad / WEIGHTS, new, "qq_proj"])


def test_module_under_wrong_parent(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "parent")
    old = key(1, "up_proj", "B")
    new = old.replace(".mlp.", ".self_attn.")
    edit_tensors(bad, lambda t: t.__setitem__(new, t.pop(old)))
    refuse_then_recover(eng, reference, hf_dir, bad, "parent", "lora_r8", must_mention=[new])


def test_tensor_that_is_not_a_lora_factor(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "extra")
    extra = "base_model.model.model.embed_tokens.weight"
    edit_tensors(bad, lambda t: t.__setitem__(extra, np.zeros((260, 64), np.float32)))
    refuse_then_recover(eng, reference, hf_dir, bad, "extra", "lora_r8", must_mention=[bad / WEIGHTS, extra])


# -------------------------------------------------------------------------- 3. rank > max_lora_rank


def test_rank_above_max_lora_rank(hf_dir, reference, tmp_path):
    small = make_engine(hf_dir, max_lora_rank=4)
    small.add_adapter(GOOD, hf_dir / "adapters" / "lora_rs_r4_qv")
    assert_serves(small, GOOD, reference, "lora_rs_r4_qv")
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "r8")
    # the "fix" for this engine is a rank-4 adapter under the same name and path
    msg = refuse_then_recover(small, reference, hf_dir, bad, "r8", "lora_rs_r4_qv",
                              must_mention=["rank 8", "max_lora_rank"])
    assert "max_lora_rank=4" in msg
    assert_serves(small, None, reference, None)


# ------------------------------------------------------------ 4. BD-LoRA nblocks vs model axis (1x4)


def test_bdlora_nblocks_must_be_multiple_of_model_axis(hf_dir, reference, tmp_path):
    eng4 = make_engine(hf_dir, mesh="1x4", max_lora_rank=8)
    eng4.add_adapter("nb4", hf_dir / "adapters" / "bdlora_nb4_r8")
    assert_serves(eng4, "nb4", reference, "bdlora_nb4_r8")
    before = (eng4.adapters, dict(eng4.pool.resident), eng4.pool.loads)
    with pytest.raises(AdapterError) as info:
        eng4.add_adapter("nb2", hf_dir / "adapters" / "bdlora_nb2_r8")
    msg = str(info.value)
    assert "nblocks=2" in msg and "model-axis size 4" in msg, msg
    assert "'nb2'" in msg, msg
    assert "nb2" not in eng4.adapters
    assert (eng4.adapters, dict(eng4.pool.resident), eng4.pool.loads) == before
    assert_serves(eng4, "nb4", reference, "bdlora_nb4_r8")
    assert_serves(eng4, None, reference, None)
    # the same name now with an adapter that fits
    eng4.add_adapter("nb2", hf_dir / "adapters" / "bdlora_nb4_r8")
    assert_serves(eng4, "nb2", reference, "bdlora_nb4_r8")
    out = eng4.batch_logits(prompts(reference), ["nb4", None, "nb2"])
    for row, ref in enumerate(("bdlora_nb4_r8", "base", "bdlora_nb4_r8")):
        np.testing.assert_allclose(out[row], reference[f"logits_{ref}"][row], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- 5. shapes / layers / partners


def _set(name, fn):
    return lambda t: t.__setitem__(name, fn(t[name]))


SHAPE_CASES = {
    "b_63_rows": (key(0, "q_proj", "B"), _set(key(0, "q_proj", "B"), lambda b: b[:63]), ["(63, 8)", "(64, 8)"]),
    "a_wrong_rank": (key(1, "v_proj", "A"), _set(key(1, "v_proj", "A"), lambda a: a[:4]), ["(4, 64)", "(8, 64)"]),
    "b_wrong_rank": (key(0, "down_proj", "B"), _set(key(0, "down_proj", "B"), lambda b: np.concatenate([b, b], 1)),
                     ["(64, 16)", "(64, 8)"]),
    "a_wrong_d_in": (key(1, "down_proj", "A"), _set(key(1, "down_proj", "A"), lambda a: a[:, :64]),
                     ["(8, 64)", "(8, 128)"]),
    "a_transposed": (key(0, "gate_proj", "A"), _set(key(0, "gate_proj", "A"), lambda a: np.ascontiguousarray(a.T)),
                     ["(64, 8)", "(8, 64)"]),
}


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_shape_does_not_fit_base(eng, hf_dir, reference, tmp_path, case):
    tensor, fn, fragments = SHAPE_CASES[case]
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / case)
    edit_tensors(bad, fn)
    refuse_then_recover(eng, reference, hf_dir, bad, case, "lora_r8",
                        must_mention=[bad / WEIGHTS, tensor, "shape", *fragments])


def test_layer_beyond_model(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "layer5")

    def add_layer5(t):
        t[key(5, "q_proj", "A")] = t[key(0, "q_proj", "A")].copy()
        t[key(5, "q_proj", "B")] = t[key(0, "q_proj", "B")].copy()

    edit_tensors(bad, add_layer5)
    msg = refuse_then_recover(eng, reference, hf_dir, bad, "layer5", "lora_r8",
                              must_mention=[bad / WEIGHTS, "layers.5.", "layer 5", "2 layers"])
    assert key(5, "q_proj", "A") in msg or key(5, "q_proj", "B") in msg


@pytest.mark.parametrize("factor", ["A", "B"])
def test_missing_partner_factor(eng, hf_dir, reference, tmp_path, factor):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / f"no_{factor}")
    gone = key(1, "k_proj", factor)
    edit_tensors(bad, lambda t: t.pop(gone))
    refuse_then_recover(eng, reference, hf_dir, bad, f"no_{factor}", "lora_r8",
                        must_mention=[bad / WEIGHTS, gone, "missing"])


def test_no_lora_tensors(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "empty")
    save_file({}, str(bad / WEIGHTS), metadata={"format": "pt"})
    refuse_then_recover(eng, reference, hf_dir, bad, "empty", "lora_r8", must_mention=[bad / WEIGHTS])


def test_bdlora_config_nblocks_disagrees_with_tensors(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "bdlora_nb2_r8", tmp_path / "nb_mismatch")
    config = json.loads((bad / CONFIG).read_text())
    config["use_bdlora"]["nblocks"] = 4
    (bad / CONFIG).write_text(json.dumps(config))
    refuse_then_recover(eng, reference, hf_dir, bad, "nb_mismatch", "bdlora_nb2_r8",
                        must_mention=[bad / WEIGHTS, "shape"])


def test_bdlora_r_not_divisible_by_nblocks(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "bdlora_nb2_r8", tmp_path / "nb3")
    config = json.loads((bad / CONFIG).read_text())
    config["use_bdlora"]["nblocks"] = 3
    (bad / CONFIG).write_text(json.dumps(config))
    refuse_then_recover(eng, reference, hf_dir, bad, "nb3", "bdlora_nb2_r8",
                        must_mention=[bad / CONFIG, "r=8", "nblocks=3"])


# ------------------------------------------------------------------------------------ 6. NaN / Inf


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "neginf"])
def test_non_finite_values(eng, hf_dir, reference, tmp_path, value):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "nonfinite")
    tensor = key(1, "up_proj", "B")

    def poison(t):
        t[tensor] = t[tensor].copy()
        t[tensor][3, 2] = value

    edit_tensors(bad, poison)
    refuse_then_recover(eng, reference, hf_dir, bad, "nonfinite", "lora_r8",
                        must_mention=[bad / WEIGHTS, tensor, "NaN or Inf"])


# --------------------------------------------------------------------------- 7. unsupported features


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"use_dora": True}, ["use_dora", "True"]),
        ({"peft_type": "IA3"}, ["peft_type", "IA3"]),
        ({"bias": "all"}, ["bias", "all"]),
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save", "lm_head"]),
        ({"rank_pattern": {"q_proj": 2}}, ["rank_pattern"]),
        ({"layers_to_transform": [0]}, ["layers_to_transform"]),
        ({"fan_in_fan_out": True}, ["fan_in_fan_out"]),
        ({"r": 0}, ["'r'", "0"]),
        ({"lora_alpha": "sixteen"}, ["lora_alpha", "sixteen"]),
    ],
    ids=["dora", "ia3", "bias", "modules_to_save", "rank_pattern", "layers_to_transform", "fan_in_fan_out",
         "r0", "alpha_str"],
)
def test_unsupported_config_fields(eng, hf_dir, reference, tmp_path, changes, fragments):
    bad = copy_adapter(hf_dir, "lora_rs_r4_qv", tmp_path / "unsupported")
    edit_config(bad, **changes)
    refuse_then_recover(eng, reference, hf_dir, bad, "unsupported", "lora_rs_r4_qv",
                        must_mention=[bad / CONFIG, *fragments])


# -------------------------------------------------------------- 8. dense LoRA under bdlora (1x2)


def test_dense_lora_under_bdlora_served_exactly_with_enough_rank(hf_dir, reference):
    eng2 = make_engine(hf_dir, mesh="1x2", max_lora_rank=16)
    eng2.add_adapter("dense", hf_dir / "adapters" / "lora_r8")
    eng2.add_adapter("bd", hf_dir / "adapters" / "bdlora_nb2_r8")
    assert_serves(eng2, "dense", reference, "lora_r8")
    assert_serves(eng2, "bd", reference, "bdlora_nb2_r8")
    out = eng2.batch_logits(prompts(reference), ["bd", "dense", None])
    for row, ref in enumerate(("bdlora_nb2_r8", "lora_r8", "base")):
        np.testing.assert_allclose(out[row], reference[f"logits_{ref}"][row], atol=ATOL, rtol=0)


def test_dense_lora_under_bdlora_refused_without_enough_rank(hf_dir, reference, tmp_path):
    eng2 = make_engine(hf_dir, mesh="1x2", max_lora_rank=8)
    eng2.add_adapter(GOOD, hf_dir / "adapters" / "lora_rs_r4_qv")  # rank 4 * 2 <= 8: fits
    assert_serves(eng2, GOOD, reference, "lora_rs_r4_qv")
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "dense8")
    msg = refuse_then_recover(eng2, reference, hf_dir, bad, "dense8", "bdlora_nb2_r8",
                              must_mention=["max_lora_rank >= 16", "'dense8'", "rank 8"])
    assert "have 8" in msg


# ------------------------------------------------------------------------- 9. round trip, no torch


ROUND_TRIP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from pathlib import Path
    from bdlora_jax.checkpoint import load_model_config
    from bdlora_jax.lora.peft_io import read_adapter, write_adapter
    hf, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = load_model_config(hf / "model")
    for name in sys.argv[3:]:
        write_adapter(read_adapter(hf / "adapters" / name, cfg), out / name)
    assert sys.modules["torch"] is None
    print("ok")
    """
)


@pytest.fixture(scope="module")
def round_tripped(hf_dir, tmp_path_factory):
    """Every fixture adapter read and written again in a fresh interpreter in which torch cannot be imported."""
    out = tmp_path_factory.mktemp("round_trip")
    proc = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP_SCRIPT, str(hf_dir), str(out), *FIXTURE_ADAPTERS],
        capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("fixture", FIXTURE_ADAPTERS)
def test_round_trip_files(round_tripped, hf_dir, fixture):
    original, written = hf_dir / "adapters" / fixture, round_tripped / fixture
    a, b = load_file(str(original / WEIGHTS)), load_file(str(written / WEIGHTS))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    ca, cb = json.loads((original / CONFIG).read_text()), json.loads((written / CONFIG).read_text())
    assert cb["r"] == ca["r"]
    assert cb["lora_alpha"] == ca["lora_alpha"]
    assert bool(cb.get("use_rslora", False)) == bool(ca.get("use_rslora", False))
    assert set(cb["target_modules"]) == set(ca["target_modules"])
    assert cb.get("use_bdlora") == ca.get("use_bdlora")
    assert cb.get("peft_type", "LORA") == "LORA"


@pytest.mark.parametrize("fixture", FIXTURE_ADAPTERS)
def test_round_trip_in_process(model_config, hf_dir, tmp_path, fixture):
    adapter = read_adapter(hf_dir / "adapters" / fixture, model_config)
    again = read_adapter(write_adapter(adapter, tmp_path / fixture), model_config)
    assert (again.rank, again.alpha, again.use_rslora, again.nblocks) == (
        adapter.rank, adapter.alpha, adapter.use_rslora, adapter.nblocks)
    assert set(again.bd_a_modules) == set(adapter.bd_a_modules)
    assert set(again.bd_b_modules) == set(adapter.bd_b_modules)
    assert again.modules.keys() == adapter.modules.keys()
    for k, f in adapter.modules.items():
        g = again.modules[k]
        assert (g.a_blocks, g.b_blocks) == (f.a_blocks, f.b_blocks), k
        np.testing.assert_array_equal(g.a, f.a)
        np.testing.assert_array_equal(g.b, f.b)


def test_round_trip_identical_engine_logits(eng, round_tripped, hf_dir, reference):
    for fixture in FIXTURE_ADAPTERS:
        eng.add_adapter(f"orig_{fixture}", hf_dir / "adapters" / fixture)
        eng.add_adapter(f"rt_{fixture}", round_tripped / fixture)
        orig = np.stack(eng.batch_logits(prompts(reference), [f"orig_{fixture}"] * 3))
        again = np.stack(eng.batch_logits(prompts(reference), [f"rt_{fixture}"] * 3))
        np.testing.assert_array_equal(again, orig, err_msg=fixture)
        np.testing.assert_allclose(again, reference[f"logits_{fixture}"], atol=ATOL, rtol=0)
        eng.remove_adapter(f"orig_{fixture}")
        eng.remove_adapter(f"rt_{fixture}")
    assert eng.adapters == [GOOD]


def test_add_adapter_object(eng, model_config, hf_dir, reference):
    adapter = read_adapter(hf_dir / "adapters" / "bdlora_nb4_r8", model_config)
    eng.add_adapter("as_object", adapter)
    assert_serves(eng, "as_object", reference, "bdlora_nb4_r8")
    eng.remove_adapter("as_object")


# ------------------------------------------------------------------------------ 10. registry errors


def test_registry_errors(eng, hf_dir, reference):
    with pytest.raises(KeyError, match="nobody"):
        eng.remove_adapter("nobody")
    with pytest.raises(KeyError, match="nobody"):
        eng.logits(prompts(reference)[0], adapter="nobody")

    loads = eng.pool.loads
    with pytest.raises(ValueError, match=GOOD) as info:
        eng.add_adapter(GOOD, hf_dir / "adapters" / "lora_r8")
    assert "already registered" in str(info.value)
    assert eng.pool.loads == loads
    assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")  # still the first adapter, not the second

    eng.add_adapter("temp", hf_dir / "adapters" / "lora_r8")
    assert_serves(eng, "temp", reference, "lora_r8")
    assert "temp" in eng.pool.resident
    eng.remove_adapter("temp")
    assert "temp" not in eng.adapters and "temp" not in eng.pool.resident
    with pytest.raises(KeyError, match="temp"):
        eng.logits(prompts(reference)[0], adapter="temp")
    with pytest.raises(KeyError):
        eng.remove_adapter("temp")
    # the name is reusable, and its (stale) old slot contents must not be served for the new adapter
    eng.add_adapter("temp", hf_dir / "adapters" / "bdlora_nb2_r8")
    assert_serves(eng, "temp", reference, "bdlora_nb2_r8")
    eng.remove_adapter("temp")
    assert eng.adapters == [GOOD]
    assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")


# -------------------------------------------------------------------------------------- 11. LRU pool


def test_lru_pool_eviction(hf_dir, reference):
    lru = make_engine(hf_dir, max_loras=2)
    names = {"a": "lora_rs_r4_qv", "b": "lora_r8", "c": "bdlora_nb2_r8"}
    for name, fixture in names.items():
        lru.add_adapter(name, hf_dir / "adapters" / fixture)
    pool = lru.pool
    assert (pool.loads, pool.evictions, len(pool.resident)) == (0, 0, 0)  # registering loads nothing

    def use(name, loads, evictions, resident):
        assert_serves(lru, name, reference, names[name])
        assert (pool.loads, pool.evictions) == (loads, evictions), (name, pool.loads, pool.evictions)
        assert list(pool.resident) == resident  # least recently used first
        assert sorted(pool.resident.values()) == sorted(set(pool.resident.values()))
        assert all(1 <= s <= 2 for s in pool.resident.values())

    # round robin over three adapters with two slots: every use is a miss and evicts
    use("a", 1, 0, ["a"])
    use("b", 2, 0, ["a", "b"])
    use("c", 3, 1, ["b", "c"])
    use("a", 4, 2, ["c", "a"])
    use("b", 5, 3, ["a", "b"])
    use("c", 6, 4, ["b", "c"])
    # hits do not load; a hit refreshes recency, so the other one is evicted next (LRU, not FIFO)
    use("c", 6, 4, ["b", "c"])
    use("b", 6, 4, ["c", "b"])
    use("a", 7, 5, ["b", "a"])
    use("b", 7, 5, ["a", "b"])
    # base model needs no slot
    assert_serves(lru, None, reference, None)
    assert (pool.loads, pool.evictions) == (7, 5)

    # one batch with two adapters and the base: a (resident) + c (evicts b, the LRU not in this batch)
    out = lru.batch_logits(prompts(reference), ["c", None, "a"])
    for row, ref in enumerate(("bdlora_nb2_r8", "base", "lora_rs_r4_qv")):
        np.testing.assert_allclose(out[row], reference[f"logits_{ref}"][row], atol=ATOL, rtol=0)
    assert (pool.loads, pool.evictions) == (8, 6)
    assert set(pool.resident) == {"a", "c"}

    # three distinct adapters in one batch do not fit two slots; nothing is changed by the refusal
    resident = dict(pool.resident)
    with pytest.raises(PoolFullError):
        lru.batch_logits(prompts(reference), ["a", "b", "c"])
    assert dict(pool.resident) == resident
    assert_serves(lru, "a", reference, names["a"])
    assert_serves(lru, "c", reference, names["c"])

    # removing a resident adapter frees its slot: the next load takes it without evicting
    lru.remove_adapter("c")
    loads, evictions = pool.loads, pool.evictions
    assert_serves(lru, "b", reference, names["b"])
    assert (pool.loads, pool.evictions) == (loads + 1, evictions)
    assert set(pool.resident) == {"a", "b"}
    assert_serves(lru, "a", reference, names["a"])


# ------------------------------------------------------------ agreement with PEFT's config semantics


# A missing lora_alpha takes PEFT's LoraConfig default (8), not r (checked with peft 0.21.2: PeftModel on this
# config gives logits_lora_rs_r4_qv within 5e-6).
def test_missing_lora_alpha_uses_peft_default(eng, model_config, hf_dir, reference, tmp_path):
    path = copy_adapter(hf_dir, "lora_rs_r4_qv", tmp_path / "no_alpha")  # its lora_alpha is 8 = PEFT's default
    config = json.loads((path / CONFIG).read_text())
    del config["lora_alpha"]
    (path / CONFIG).write_text(json.dumps(config))
    assert read_adapter(path, model_config).alpha == 8
    try:
        eng.add_adapter("no_alpha", path)
        assert_serves(eng, "no_alpha", reference, "lora_rs_r4_qv")
    finally:
        if "no_alpha" in eng.adapters:
            eng.remove_adapter("no_alpha")


# Tensors of modules that target_modules does not name would be dropped by PEFT; serving them would be other
# math, so the adapter is refused with a message naming target_modules and the stray module.
def test_tensors_outside_target_modules_are_refused(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "qv_config")
    edit_config(bad, target_modules=["q_proj", "v_proj"])
    try:
        refuse_then_recover(eng, reference, hf_dir, bad, "qv_config", "lora_r8",
                            must_mention=[bad / "adapter_model.safetensors", "target_modules", "down_proj"])
    finally:
        if "qv_config" in eng.adapters:
            eng.remove_adapter("qv_config")


# `layer_replication` (PEFT duplicates base layers before adapting them, giving a deeper model) is refused.
def test_layer_replication_refused(eng, hf_dir, reference, tmp_path):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "layer_rep")
    edit_config(bad, layer_replication=[[0, 2], [1, 2]])
    try:
        refuse_then_recover(eng, reference, hf_dir, bad, "layer_rep", "lora_r8",
                            must_mention=[bad / CONFIG, "layer_replication"])
    finally:
        if "layer_rep" in eng.adapters:
            eng.remove_adapter("layer_rep")
