"""The training step: compiled once (resume included), checkpoints exactly on save_every / keep_last and at the end,
and packed rows and the chunked cross-entropy give the padded, whole loss and gradients on every mesh and strategy."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from bdlora_jax.train.config import TrainConfig
from bdlora_jax.train.trainer import Trainer

# One layer (every adapted module is there) with random weights: the step compiles in seconds
ONE_LAYER = """name: one-layer
vocab_size: 256
hidden_size: 64
intermediate_size: 128
num_hidden_layers: 1
num_attention_heads: 8
num_key_value_heads: 4
head_dim: 8
"""
MESH_STRATEGIES = [("1x1", "replicated"), ("1x8", "replicated"), ("1x8", "slora"), ("1x8", "bdlora")]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two adapters' token-id datasets of 3 to 14 tokens an example (labels mask some prompts)."""
    root = tmp_path_factory.mktemp("data")
    (root / "one-layer.yaml").write_text(ONE_LAYER)
    rng = np.random.default_rng(0)
    paths = {}
    for name, offset in (("low", 0), ("high", 120)):
        with (root / f"{name}.jsonl").open("w") as f:
            for _ in range(30):
                ids = (offset + rng.integers(0, 100, rng.integers(3, 15))).tolist()
                labels = [-100] * 2 + ids[2:] if rng.random() < 0.5 else ids
                f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
        paths[name] = str(root / f"{name}.jsonl")
    return paths


def _config(datasets, out, **changes):
    base = dict(model=str(Path(datasets["low"]).parent / "one-layer.yaml"), adapters=datasets, kind="bdlora", nblocks=8, rank=8, batch_size=4, seq_len=16, steps=5,
                learning_rate=1e-2, warmup_steps=1, eval_fraction=0.0, save_every=100, out_dir=str(out))
    return TrainConfig(**{**base, **changes})


def _checkpoint_steps(out):
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.parametrize("mesh,strategy,keep_last,kept", [("1x1", "replicated", 10, [3, 5, 6, 8]),
                                                          ("1x8", "replicated", 2, [6, 8]),
                                                          ("1x8", "slora", 10, [3, 5, 6, 8]),
                                                          ("1x8", "bdlora", 2, [6, 8])])
def test_the_step_compiles_once_and_saves_on_save_every_and_at_the_end(datasets, tmp_path, mesh, strategy,
                                                                       keep_last, kept):
    cfg = _config(datasets, tmp_path, mesh=mesh, strategy=strategy, steps=8, save_every=3, keep_last=keep_last)
    first = Trainer(cfg)
    first.fit(steps=5, progress=False)
    assert first._step._cache_size() == 1
    assert _checkpoint_steps(tmp_path) == [3, 5]
    resumed = Trainer(cfg)
    assert [r["step"] for r in resumed.fit(progress=False)] == [6, 7, 8]
    assert resumed._step._cache_size() == 1
    assert _checkpoint_steps(tmp_path) == kept


def _trained_like(factors, seed=0):
    """The factors with every entry moved by a little noise, so that B (zeros at the start) passes gradients to A."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), factors)


def _losses_and_grads(trainer, factors, batch):
    """(each token's weighted loss, each adapter's loss, the gradients), on the host."""
    def run(factors, batch):
        return trainer.token_losses(factors, batch), jax.grad(trainer.adapter_losses, has_aux=True)(factors, batch)

    tokens, (grads, losses) = jax.jit(run)(factors, batch)
    return np.asarray(tokens), np.asarray(losses), jax.tree.map(np.asarray, grads)


def _assert_close(got, want):
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    for key in want[2]:
        for g, w in zip(got[2][key], want[2][key]):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=MESH_STRATEGIES, ids=["-".join(p) for p in MESH_STRATEGIES])
def packed_trainer(request, datasets, tmp_path_factory):
    mesh, strategy = request.param
    return Trainer(_config(datasets, tmp_path_factory.mktemp("packed"), mesh=mesh, strategy=strategy, packing=True))


def test_a_packed_batch_gives_each_example_its_padded_loss_and_gradients(packed_trainer):
    trainer = packed_trainer
    factors = _trained_like(trainer.train_state.factors)
    rows, slots = trainer.rows(0)
    assert sum(len(row) for row in rows) > len(rows)  # rows really hold several examples
    packed = trainer.batch(0)
    examples = [e for row in rows for e in row]
    padded = trainer._arrays([[e] for e in examples], [s for row, s in zip(rows, slots) for _ in row], packed=False)
    from_packed, from_padded = _losses_and_grads(trainer, factors, packed), _losses_and_grads(trainer, factors, padded)
    packed_tokens, padded_tokens = from_packed[0], from_padded[0]
    index = 0
    for r, row in enumerate(rows):
        offset = 0
        for example in row:
            n = len(example.tokens) - 1
            np.testing.assert_allclose(packed_tokens[r, offset:offset + n], padded_tokens[index, :n], rtol=1e-5,
                                       atol=1e-6)
            offset, index = offset + n, index + 1
    _assert_close(from_packed, from_padded)


@pytest.mark.parametrize("mesh,strategy", MESH_STRATEGIES)
def test_the_chunked_cross_entropy_gives_the_whole_loss_and_gradients(datasets, tmp_path, mesh, strategy):
    whole = Trainer(_config(datasets, tmp_path / "whole", mesh=mesh, strategy=strategy, packing=True))
    chunked = Trainer(_config(datasets, tmp_path / "chunked", mesh=mesh, strategy=strategy, packing=True, loss_chunk_tokens=7))
    factors = _trained_like(whole.train_state.factors)
    batch = whole.batch(1)
    got, want = _losses_and_grads(chunked, factors, batch), _losses_and_grads(whole, factors, batch)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    _assert_close(got, want)
    assert chunked.cfg.loss_chunk_tokens == 7 and np.asarray(batch.inputs).size % 7  # a ragged last chunk
