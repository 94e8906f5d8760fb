"""Our logits equal Hugging Face transformers + PEFT logits on the committed tiny fixtures."""

import json
import shutil

import numpy as np
import pytest

from bdlora_jax import Engine
from bdlora_jax.checkpoint import CheckpointError, load_model_config, load_tokenizer

ADAPTERS = ("lora_r8", "lora_rs_r4_qv", "bdlora_nb2_r8", "bdlora_nb4_r8")


@pytest.fixture(scope="module")
def engine(hf_dir):
    eng = Engine.from_pretrained(hf_dir / "model", mesh="1x1", strategy="replicated", max_loras=4, max_lora_rank=8)
    for name in ADAPTERS:
        eng.add_adapter(name, hf_dir / "adapters" / name)
    return eng


def _batch(eng, reference, adapter):
    prompts = [list(p) for p in reference["prompts"]]
    return np.stack(eng.batch_logits(prompts, [adapter] * len(prompts)))


def test_base_logits_match_transformers(engine, reference):
    np.testing.assert_allclose(_batch(engine, reference, None), reference["logits_base"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_logits_match_peft(engine, reference, name):
    np.testing.assert_allclose(_batch(engine, reference, name), reference[f"logits_{name}"], atol=1e-4, rtol=0)


def test_mixed_adapter_batch_matches_peft(engine, reference):
    prompts = [list(p) for p in reference["prompts"]]
    names = [None, "lora_r8", "bdlora_nb4_r8"]
    out = engine.batch_logits(prompts, names)
    for i, name in enumerate(names):
        np.testing.assert_allclose(out[i], reference[f"logits_{name or 'base'}"][i], atol=1e-4, rtol=0)


def test_bdlora_strategy_matches_peft_on_two_devices(hf_dir, reference):
    eng = Engine.from_pretrained(hf_dir / "model", mesh="1x2", strategy="bdlora", max_loras=2, max_lora_rank=8)
    for name in ("bdlora_nb2_r8", "bdlora_nb4_r8"):
        eng.add_adapter(name, hf_dir / "adapters" / name)
        np.testing.assert_allclose(_batch(eng, reference, name), reference[f"logits_{name}"], atol=1e-4, rtol=0)


def test_tied_embeddings_match_transformers(hf_dir, reference):
    eng = Engine.from_pretrained(hf_dir / "model_tied", mesh="1x1", strategy="replicated", max_loras=1, max_lora_rank=8)
    assert eng.model_config.tie_word_embeddings
    np.testing.assert_allclose(_batch(eng, reference, None), reference["logits_tied"], atol=1e-4, rtol=0)


def test_both_rope_config_forms_give_the_same_config(hf_dir, tmp_path):
    data = json.loads((hf_dir / "model" / "config.json").read_text())
    assert "rope_parameters" in data
    rope = dict(data.pop("rope_parameters"))
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(data))
    legacy, current = load_model_config(tmp_path), load_model_config(hf_dir / "model")
    assert legacy.rope_scaling == current.rope_scaling and legacy.rope_theta == current.rope_theta
    assert current.rope_scaling.factor == 8.0 and current.rope_theta == 500000.0


def test_sharded_checkpoint_index_loads_the_same_weights(hf_dir, reference, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(hf_dir / "model" / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(hf_dir / "model" / "config.json", tmp_path / "config.json")
    eng = Engine.from_pretrained(tmp_path, mesh="1x4", strategy="slora", max_loras=1, max_lora_rank=8)
    np.testing.assert_allclose(_batch(eng, reference, None), reference["logits_base"], atol=1e-4, rtol=0)


def test_missing_tensor_names_the_tensor(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(hf_dir / "model" / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(hf_dir / "model" / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        Engine.from_pretrained(tmp_path, mesh="1x1", strategy="replicated", max_loras=1, max_lora_rank=8)


def test_tokenizer_is_byte_level(hf_dir):
    tok = load_tokenizer(hf_dir / "model")
    assert tok.encode("Hello").ids == [72, 101, 108, 108, 111]
    assert tok.decode([72, 101, 108, 108, 111]) == "Hello"


@pytest.mark.parametrize("mesh,strategy", [("1x1", "bdlora"), ("1x4", "slora")])
def test_bfloat16_weights_stay_within_bfloat16_error(hf_dir, reference, mesh, strategy):
    import jax

    eng = Engine.from_pretrained(hf_dir / "model", mesh=mesh, strategy=strategy, max_loras=1, max_lora_rank=8,
                                 dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves((eng.state, eng.pool.bank))} == {"bfloat16"}
    eng.add_adapter("bd", hf_dir / "adapters" / "bdlora_nb4_r8")
    for name, key in ((None, "logits_base"), ("bd", "logits_bdlora_nb4_r8")):
        got = _batch(eng, reference, name)
        assert got.dtype == np.float32
        # bfloat16 keeps 8 mantissa bits (unit roundoff 2^-8); through two layers the logits stay within 2^-5
        relative = np.linalg.norm(got - reference[key]) / np.linalg.norm(reference[key])
        assert relative < 2 ** -5, relative


def test_pallas_lora_impl_matches_peft(hf_dir, reference):
    # without a GPU, lora_impl="pallas" runs the Triton kernels in Pallas interpret mode
    eng = Engine.from_pretrained(hf_dir / "model", mesh="1x2", strategy="bdlora", max_loras=1, max_lora_rank=8,
                                 lora_impl="pallas")
    eng.add_adapter("bd", hf_dir / "adapters" / "bdlora_nb2_r8")
    np.testing.assert_allclose(_batch(eng, reference, "bd"), reference["logits_bdlora_nb2_r8"], atol=1e-4, rtol=0)
