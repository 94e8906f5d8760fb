"""The Engine serves the base model and every fixture adapter, from a directory or as an adapter object, with the
reference logits, one adapter (or none) per row of a batch.
"""

from __future__ import annotations

import numpy as np
from helpers import ATOL, FIXTURE_ADAPTERS, GOOD, assert_serves, prompts

from bdlora_jax.adapters.peft_io import read_adapter


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


def test_add_adapter_object(eng, model_config, hf_dir, reference):
    adapter = read_adapter(hf_dir / "adapters" / "bdlora_nb4_r8", model_config)
    eng.add_adapter("as_object", adapter)
    assert_serves(eng, "as_object", reference, "bdlora_nb4_r8")
    eng.remove_adapter("as_object")
