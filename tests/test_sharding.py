"""Every strategy on every mesh gives the single-device logits for a batch mixing adapters, row by row."""

import numpy as np
import pytest
from helpers import MESHES, STRATEGIES

from bdlora_jax import Engine
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.checkpoint import load_model_config
from bdlora_jax.config import ModelConfig
from bdlora_jax.mesh import make_mesh, parse_mesh
from bdlora_jax.sharding import make_plan

ROWS = [  # (adapter, length): no adapter, dense LoRA (fixture, q/v only), dense LoRA, BD-LoRA 8 and 16 blocks
    (None, 12), ("lora_rs_r4_qv", 7), ("dense_r2", 12), ("bd_nb8_r16", 9), ("bd_nb16_r16", 12), (None, 5),
]


@pytest.fixture(scope="module")
def adapters(hf_dir):
    config = load_model_config(hf_dir / "model")
    return {
        "dense_r2": random_adapter(config, "dense_r2", rank=2, seed=1),
        "bd_nb8_r16": random_adapter(config, "bd_nb8_r16", rank=16, nblocks=8, seed=2),
        "bd_nb16_r16": random_adapter(config, "bd_nb16_r16", rank=16, nblocks=16, seed=3),
    }


def _engine(hf_dir, adapters, mesh, strategy):
    eng = Engine.from_pretrained(hf_dir / "model", mesh=mesh, strategy=strategy, max_loras=4, max_lora_rank=32)
    eng.add_adapter("lora_rs_r4_qv", hf_dir / "adapters" / "lora_rs_r4_qv")
    for name, adapter in adapters.items():
        eng.add_adapter(name, adapter)
    return eng


def _sequences(vocab):
    rng = np.random.default_rng(0)
    return [list(rng.integers(0, vocab, n)) for _, n in ROWS]


@pytest.fixture(scope="module")
def single_device(hf_dir, adapters):
    eng = _engine(hf_dir, adapters, "1x1", "replicated")
    return eng.batch_logits(_sequences(eng.model_config.vocab_size), [a for a, _ in ROWS])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_mixed_batch_matches_single_device(hf_dir, adapters, single_device, mesh, strategy):
    eng = _engine(hf_dir, adapters, mesh, strategy)
    sequences = _sequences(eng.model_config.vocab_size)
    batch = eng.batch_logits(sequences, [a for a, _ in ROWS])
    for got, want in zip(batch, single_device):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for i, (adapter, _) in enumerate(ROWS):
        # The row alone: every other row carries no request (token 0, no adapter) but keeps its length, so the
        # matmuls keep the batch's shapes (XLA's CPU kernels round differently for other shapes) and only a leak
        # between rows could change row i.
        emptied = [seq if j == i else [0] * len(seq) for j, seq in enumerate(sequences)]
        alone = eng.batch_logits(emptied, [adapter if j == i else None for j in range(len(ROWS))])[i]
        np.testing.assert_allclose(alone, batch[i], atol=1e-5, rtol=0)


def test_adapters_change_the_logits(single_device):
    base = single_device[0]
    for i in (2, 4):
        assert np.abs(single_device[i] - base[: len(single_device[i])]).max() > 1e-2


def test_kv_heads_fall_back_to_replicated_when_the_model_axis_does_not_divide_them(hf_dir):
    config = load_model_config(hf_dir / "model")
    assert config.num_kv_heads == 4
    assert make_plan(make_mesh("1x8"), "bdlora", config).kv_replicated
    assert not make_plan(make_mesh("1x4"), "bdlora", config).kv_replicated


def test_undivisible_shapes_get_clear_errors():
    config = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=6,
                         num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="num_heads=6 is not divisible by the model-axis size 4"):
        make_plan(make_mesh("1x4"), "bdlora", config)
    with pytest.raises(ValueError, match="max_lora_rank=5 must be divisible"):
        make_plan(make_mesh("1x2"), "slora", config, max_lora_rank=5)


@pytest.mark.parametrize("spec", ["8", "1x", "0x8", "axb", "1x2x3"])
def test_bad_mesh_strings_are_refused(spec):
    with pytest.raises(ValueError, match="expected 'DxM'"):
        parse_mesh(spec)
