"""Adapters that do not fit the bank layout (bdlora_jax.adapters.bank) are refused by name, end to end through the
Engine: rank above max_lora_rank, BD-LoRA blocks against the model axis, dense LoRA under bdlora.

Each refusal leaves the engine serving what it had, and a fitting adapter under the same name serves exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ATOL, GOOD, assert_serves, copy_adapter, make_engine, prompts, refuse_then_recover

from bdlora_jax.errors import AdapterError

# ----------------------------------------------------------------------------- rank > max_lora_rank


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


# --------------------------------------------------------------- BD-LoRA nblocks vs model axis (1x4)


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


# ----------------------------------------------------------------- dense LoRA under bdlora (1x2)


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
