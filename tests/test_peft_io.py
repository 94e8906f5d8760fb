"""PEFT adapter directories read, validated and written (bdlora_jax.adapters.peft_io), end to end through the Engine.

Every refusal test checks the error type, that the message names the offending file / tensor / field /
value, and that the engine afterwards still serves what it had: a previously registered adapter still
matches the reference logits, the bad name is not registered, the pool is untouched, and re-adding a fixed
adapter under the same name works. The round trips write every fixture adapter again, with and without torch.

The engine is module-scoped and every forward uses the same batch shape (the three reference prompts), so
it compiles its forward once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import ADAPTER_CONFIG_FILE as CONFIG
from helpers import ADAPTER_WEIGHTS_FILE as WEIGHTS
from helpers import (
    ATOL,
    FIXTURE_ADAPTERS,
    GOOD,
    assert_serves,
    copy_adapter,
    edit_config,
    edit_tensors,
    prompts,
    refuse_then_recover,
)
from helpers import lora_tensor_name as key
from safetensors.numpy import load_file, save_file

from bdlora_jax.adapters.peft_io import read_adapter, write_adapter
from bdlora_jax.errors import AdapterError


def test_adapter_error_is_value_error():
    assert issubclass(AdapterError, ValueError)


# ---------------------------------------------------------------------- missing / unreadable files


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


# -------------------------------------------------------------------------------- unknown modules


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


# ------------------------------------------------------------------------- shapes / layers / partners


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


# --------------------------------------------------------------------------------------- NaN / Inf


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


# ------------------------------------------------------------------------------ unsupported features


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


# ---------------------------------------------------------------------------- round trip, no torch


ROUND_TRIP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from pathlib import Path
    from bdlora_jax.adapters.peft_io import read_adapter, write_adapter
    from bdlora_jax.checkpoint import load_model_config
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
        [sys.executable, "-c", ROUND_TRIP_SCRIPT, str(hf_dir), str(out), *FIXTURE_ADAPTERS], check=False,
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


# ------------------------------------------------------------- every config field type-checked, scale finite


def _config_text(replace: str, by: str):
    """An edit of adapter_config.json's text (for what json.dumps cannot write: NaN, huge integers, deep nesting)."""

    def edit(path):
        text = (path / CONFIG).read_text()
        assert replace in text
        (path / CONFIG).write_text(text.replace(replace, by, 1))

    return edit


def _config_fields(**changes):
    return lambda path: edit_config(path, **changes)


ALPHA = '"lora_alpha": 16'
CONFIG_CASES = {
    "target_modules_5": ("lora_r8", _config_fields(target_modules=5), ["'target_modules'=5", "list of module names"]),
    "target_modules_bad_regex": ("lora_r8", _config_fields(target_modules="("),
                                 ["'target_modules'='('", "regular expression"]),
    "target_modules_not_strings": ("lora_r8", _config_fields(target_modules=["q_proj", 3]), ["'target_modules'"]),
    "bd_a_not_strings": ("bdlora_nb2_r8", _config_fields(use_bdlora={"nblocks": 2, "target_modules_bd_a": [1]}),
                         ["'use_bdlora.target_modules_bd_a'=[1]", "list of module names"]),
    "bd_match_strict_string": ("bdlora_nb2_r8", _config_fields(use_bdlora={"nblocks": 2, "match_strict": "no"}),
                               ["'use_bdlora.match_strict'"]),
    "nblocks_string": ("bdlora_nb2_r8", _config_fields(use_bdlora={"nblocks": "2"}), ["'use_bdlora.nblocks'"]),
    "use_rslora_string": ("lora_r8", _config_fields(use_rslora="yes"), ["'use_rslora'", "true or false"]),
    "lora_dropout_list": ("lora_r8", _config_fields(lora_dropout=[0.1]), ["'lora_dropout'"]),
    "base_model_number": ("lora_r8", _config_fields(base_model_name_or_path=7), ["'base_model_name_or_path'"]),
    "peft_type_null": ("lora_r8", _config_fields(peft_type=None), ["'peft_type'"]),
    "alpha_nan": ("lora_r8", _config_text(ALPHA, '"lora_alpha": NaN'), ["'lora_alpha'=nan", "finite"]),
    "alpha_infinity": ("lora_r8", _config_text(ALPHA, '"lora_alpha": Infinity'), ["'lora_alpha'=inf", "finite"]),
    "alpha_1e308": ("lora_r8", _config_fields(lora_alpha=1e308), ["'lora_alpha'=1e+308", "float32"]),
    "alpha_400_digits": ("lora_r8", _config_text(ALPHA, '"lora_alpha": ' + "9" * 400), ["'lora_alpha'=999", "finite"]),
    "alpha_5000_digits": ("lora_r8", _config_text(ALPHA, '"lora_alpha": ' + "9" * 5000), ["not valid JSON"]),
    "nested_100000": ("lora_r8", _config_text(ALPHA, '"deep": ' + "[" * 100_000 + "]" * 100_000 + ", " + ALPHA),
                      ["not valid JSON", "nested too deeply"]),
    "oversized": ("lora_r8", _config_fields(padding="x" * (1 << 20)), ["larger than 1048576 bytes"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_fields_type_checked(eng, hf_dir, reference, tmp_path, case):
    fixture, edit, fragments = CONFIG_CASES[case]
    bad = copy_adapter(hf_dir, fixture, tmp_path / "typed")
    edit(bad)
    message = refuse_then_recover(eng, reference, hf_dir, bad, "typed", fixture,
                                  must_mention=[bad / CONFIG, *fragments])
    assert len(message) < 1000  # values are shortened in messages


def test_negative_alpha_is_allowed(model_config, hf_dir, tmp_path):
    path = copy_adapter(hf_dir, "lora_r8", tmp_path / "negative")
    edit_config(path, lora_alpha=-16)
    assert read_adapter(path, model_config).scale == -2.0


def test_unknown_config_fields_are_ignored(model_config, hf_dir, tmp_path):
    path = copy_adapter(hf_dir, "lora_r8", tmp_path / "unknown")
    edit_config(path, some_future_peft_field={"anything": [1, "x"]})
    assert read_adapter(path, model_config).rank == 8


# -------------------------------------------------------------------------------------- tensor dtypes


@pytest.mark.parametrize("dtype, shown", [(np.int8, "I8"), (np.int32, "I32"), (np.float64, "F64"), (np.bool_, "BOOL")])
def test_non_float_tensors_are_refused(eng, hf_dir, reference, tmp_path, dtype, shown):
    bad = copy_adapter(hf_dir, "lora_r8", tmp_path / "dtype")
    tensor = key(1, "k_proj", "B")
    edit_tensors(bad, _set(tensor, lambda t: t.astype(dtype)))
    refuse_then_recover(eng, reference, hf_dir, bad, "dtype", "lora_r8",
                        must_mention=[bad / WEIGHTS, tensor, shown, "floating-point"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_tensors_are_read(model_config, hf_dir, tmp_path, dtype):
    import ml_dtypes

    half = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    path = copy_adapter(hf_dir, "lora_r8", tmp_path / dtype)
    original = load_file(str(path / WEIGHTS))
    edit_tensors(path, lambda t: t.update({k: v.astype(half) for k, v in t.items()}))
    adapter = read_adapter(path, model_config)
    factors = adapter.modules[(0, "q_proj")]
    assert factors.a.dtype == np.float32
    np.testing.assert_array_equal(factors.a, original[key(0, "q_proj", "A")].astype(half).astype(np.float32))


# ------------------------------------------------------------------------ confinement to a root directory


@pytest.mark.parametrize("linked", [CONFIG, WEIGHTS])
def test_root_confines_every_file_read(model_config, hf_dir, tmp_path, linked):
    from bdlora_jax.errors import ForbiddenPathError

    root, outside = tmp_path / "root", copy_adapter(hf_dir, "lora_r8", tmp_path / "outside")
    inside = copy_adapter(hf_dir, "lora_r8", root / "adapter")
    (inside / linked).unlink()
    (inside / linked).symlink_to(outside / linked)
    with pytest.raises(ForbiddenPathError) as info:
        read_adapter(inside, model_config, root=root)
    for fragment in (inside / linked, outside / linked, root):
        assert str(fragment) in info.value.message
    assert read_adapter(inside, model_config).rank == 8  # without a root, symlinks are followed anywhere
    (inside / linked).unlink()
    (inside / linked).symlink_to(root / ".." / "outside" / ".." / "root" / "adapter" / ".." / ".." / "outside" / linked)
    with pytest.raises(ForbiddenPathError):
        read_adapter(inside, model_config, root=root)
    copy_adapter(hf_dir, "lora_r8", root / "real")
    (inside / linked).unlink()
    (inside / linked).symlink_to(root / "real" / linked)  # a symlink that stays under the root is fine
    assert read_adapter(inside, model_config, root=root).rank == 8


# ------------------------------------------------------------------ a registered adapter broken on disk


@pytest.mark.parametrize("breakage", ["target_modules_5", "bad_regex", "weights_gone", "unreadable"])
def test_registered_adapter_broken_on_disk(eng, hf_dir, reference, tmp_path, monkeypatch, breakage):
    """Files changed since registration are validated again when the adapter is loaded into a slot: only an
    AdapterError naming the adapter's file escapes, no slot changes, and the other adapters still serve."""
    from bdlora_jax.engine import adapter_pool

    path = copy_adapter(hf_dir, "lora_r8", tmp_path / "fragile")
    eng.add_adapter("fragile", path)
    try:
        assert "fragile" not in eng.pool.resident
        if breakage == "target_modules_5":
            edit_config(path, target_modules=5)
        elif breakage == "bad_regex":
            edit_config(path, target_modules="(")
        elif breakage == "weights_gone":
            (path / WEIGHTS).unlink()
        else:
            def unreadable(*args, **kwargs):
                raise PermissionError(13, "Permission denied", str(path / CONFIG))

            monkeypatch.setattr(adapter_pool, "read_adapter", unreadable)
        before = (dict(eng.pool.resident), eng.pool.loads)
        with pytest.raises(AdapterError) as info:
            eng.logits(prompts(reference)[0], adapter="fragile")
        assert str(path) in str(info.value)
        assert (dict(eng.pool.resident), eng.pool.loads) == before
        assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")
        monkeypatch.undo()
        copy_adapter(hf_dir, "lora_r8", path)
        assert_serves(eng, "fragile", reference, "lora_r8")
    finally:
        eng.remove_adapter("fragile")


# ------------------------------------------------------------------------------------------ adapter names


@pytest.mark.parametrize("name, fragment", [("", "empty"), ("n" * 257, "257"), ("\ud800", "surrogate"),
                                            ("a\x00b", "control"), ("tab\there", "control")],
                         ids=["empty", "too_long", "surrogate", "nul", "tab"])
def test_adapter_names(eng, hf_dir, name, fragment):
    from bdlora_jax.errors import InvalidRequestError

    before = eng.adapters
    with pytest.raises(InvalidRequestError) as info:
        eng.add_adapter(name, hf_dir / "adapters" / "lora_r8")
    assert info.value.field == "lora_name" and fragment in info.value.message
    info.value.message.encode("utf-8")  # the message itself is always valid UTF-8
    assert eng.adapters == before
