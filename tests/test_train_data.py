"""Training data: token-id rows (no tokenizer needed), their errors, and packing examples of one adapter into rows."""

import json
import shutil

import numpy as np
import pytest
from helpers import FIXTURES

from bdlora_jax.adapters.peft_io import read_adapter
from bdlora_jax.train.config import TrainConfig
from bdlora_jax.train.data import Example, PackedStream, best_fit_decreasing, pack_batch, pad_batch, read_jsonl
from bdlora_jax.train.trainer import Trainer


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(0, 50, n).astype(np.int32), (rng.random(n) > 0.3).astype(np.float32))
            for n in lengths]


def test_token_id_rows_read_as_given_with_labels_as_the_loss_mask(tmp_path):
    path = _write(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
                                           {"input_ids": [1, 2, 3]}])
    first, second = read_jsonl(path, None, 256, 257, 16, vocab_size=260)
    assert first.tokens.tolist() == [5, 6, 7, 8] and first.loss_mask.tolist() == [0, 0, 1, 1]
    assert second.tokens.tolist() == [1, 2, 3] and second.loss_mask.tolist() == [1, 1, 1]


@pytest.mark.parametrize("row,message", [
    ({"input_ids": [1]}, "ids.jsonl:2: field 'input_ids': expected a list of at least 2 integer token ids"),
    ({"input_ids": [1, "2"]}, "ids.jsonl:2: field 'input_ids': expected a list of at least 2 integer"),
    ({"input_ids": [1, 300]}, r"ids.jsonl:2: field 'input_ids': token id 300 outside the vocabulary \[0, 260\)"),
    ({"input_ids": [1, 2], "labels": [1]}, "ids.jsonl:2: field 'labels': expected a list of 2 integers"),
    ({"input_ids": [1, 2], "labels": [1, 5]}, "ids.jsonl:2: field 'labels': position 1 is 5; expected the input id 2"),
    ({"text": "hello"}, "ids.jsonl:2: a text row needs the model's tokenizer.json"),
])
def test_bad_token_id_rows_name_the_file_line_and_field(tmp_path, row, message):
    path = _write(tmp_path / "ids.jsonl", [{"input_ids": [1, 2]}, row])
    with pytest.raises(ValueError, match=message):
        read_jsonl(path, None, None, None, 16, vocab_size=260)


@pytest.mark.parametrize("mesh,strategy", [("1x1", "replicated"), ("1x8", "replicated"), ("1x8", "slora"),
                                           ("1x8", "bdlora")])
def test_a_model_without_a_tokenizer_trains_and_exports_token_id_datasets(tmp_path, mesh, strategy):
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "model", model, ignore=shutil.ignore_patterns("tokenizer.json"))
    rng = np.random.default_rng(0)
    data = {}
    for name, offset in (("low", 0), ("high", 100)):
        rows = [{"input_ids": (offset + rng.integers(0, 20, 12)).tolist()} for _ in range(40)]
        rows += [{"input_ids": [offset + 1, offset + 2, offset + 3], "labels": [-100, offset + 2, offset + 3]}]
        data[name] = str(_write(tmp_path / f"{name}.jsonl", rows))
    cfg = TrainConfig(model=str(model), adapters=data, mesh=mesh, strategy=strategy, rank=8, batch_size=4, seq_len=16, steps=8,
                      learning_rate=1e-2, warmup_steps=1, eval_fraction=0.1, save_every=100,
                      out_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    before = trainer.evaluate()
    trainer.fit(progress=False)
    after = trainer.evaluate()
    assert all(after[name] < before[name] for name in data), (before, after)
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [8]  # save_every > steps: the final save only
    paths = trainer.export()
    assert sorted(paths) == ["high", "low"]
    adapter = read_adapter(paths["low"], trainer.model_config)
    assert adapter.rank == 8 and any(np.abs(m.b).max() > 0 for m in adapter.modules.values())


def test_packed_streams_take_every_example_once_an_epoch_and_depend_only_on_the_step():
    examples = _examples([5, 9, 3, 7, 4, 8, 6, 2, 5, 7])
    stream = PackedStream(examples, rows=2, seq_len=10, seed=3)
    per_epoch = stream.rows_per_epoch
    assert per_epoch == 5  # 46 input positions in rows of 10
    rows = [row for t in range(per_epoch) for row in stream.positions(t)]  # two epochs; batches straddle them
    for row in rows:
        assert sum(len(stream._example(p).tokens) - 1 for p in row) <= 10
    for epoch in range(2):
        taken = sorted(p for row in rows[epoch * per_epoch:(epoch + 1) * per_epoch] for p in row)
        assert taken == list(range(epoch * len(examples), (epoch + 1) * len(examples)))
    order = np.random.default_rng((3, 0)).permutation(len(examples))
    assert [id(e) for row in stream.batch(0) for e in row] == [id(examples[order[p]]) for row in rows[:2] for p in row]
    fresh = PackedStream(examples, rows=2, seq_len=10, seed=3)
    assert fresh.positions(4) == stream.positions(4)  # resumed: the same rows without packing what came before


def test_best_fit_decreasing_puts_each_size_where_it_leaves_the_least_room():
    assert best_fit_decreasing([2, 6, 3, 5, 4], 10) == [[1, 4], [3, 2, 0]]
    assert best_fit_decreasing([10, 10], 10) == [[0], [1]]


def test_packing_fills_rows_of_mixed_lengths_almost_completely():
    rng = np.random.default_rng(0)
    examples = _examples(rng.integers(16, 257, size=400).tolist())
    stream = PackedStream(examples, rows=8, seq_len=256, seed=0)
    used = sum(len(e.tokens) - 1 for e in examples)
    assert used / (stream.rows_per_epoch * 256) > 0.94  # 0.949; the streaming best fit before it filled 0.89


def test_a_packed_row_holds_each_example_as_its_padded_row_does():
    examples = _examples([5, 9, 3])
    inputs, targets, weights, segments, positions = pack_batch([examples, []], 20, pad=99)
    offset = 0
    for j, example in enumerate(examples):
        alone = pad_batch([example], 20, pad=99)
        n = len(example.tokens) - 1
        for packed, padded in zip((inputs, targets, weights), alone):
            np.testing.assert_array_equal(packed[0, offset:offset + n], padded[0, :n])
        assert segments[0, offset:offset + n].tolist() == [j + 1] * n
        assert positions[0, offset:offset + n].tolist() == list(range(n))
        offset += n
    assert segments[0, offset:].tolist() == [0] * (20 - offset) and not weights[0, offset:].any()
    assert (inputs[1] == 99).all() and not segments[1].any()
