"""Training: loss goes down, every mesh and strategy trains alike, resume is exact, exports serve the trained math."""

import json
import random
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES

from bdlora_jax import Engine
from bdlora_jax.adapters.bank import slot_arrays
from bdlora_jax.train.__main__ import load_config
from bdlora_jax.train.config import TrainConfig
from bdlora_jax.train.factors import export, to_bank
from bdlora_jax.train.trainer import Trainer

MODEL = str(FIXTURES / "model")  # 2 layers, hidden 64, 4 kv heads (replicated on 1x8): quick to compile

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "jax", "lora", "mesh", "tensor", "block"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    paths = {}
    for task, fn in (("upper", str.upper), ("reverse", lambda s: s[::-1])):
        with (root / f"{task}.jsonl").open("w") as f:
            for _ in range(120):
                text = " ".join(rng.choice(WORDS) for _ in range(2))
                f.write(json.dumps({"prompt": text + "=", "completion": fn(text)}) + "\n")
        paths[task] = str(root / f"{task}.jsonl")
    return paths


def _config(datasets, tmp_path, **changes):
    base = dict(model=MODEL, adapters=datasets, kind="bdlora", nblocks=8, rank=8, alpha=16.0, batch_size=8,
                seq_len=32, steps=6, learning_rate=3e-3, warmup_steps=2, eval_every=100, save_every=2, keep_last=3,
                eval_fraction=0.0, out_dir=str(tmp_path / "run"))
    return TrainConfig(**{**base, **changes})


def test_short_run_lowers_the_eval_loss(datasets, tmp_path):
    trainer = Trainer(_config(datasets, tmp_path, steps=30, learning_rate=1e-2, eval_fraction=0.1))
    before = trainer.evaluate()
    trainer.fit(progress=False)
    after = trainer.evaluate()
    for name in datasets:
        assert after[name] < before[name] - 0.5, (before, after)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 and "eval_loss" in json.loads(lines[-1])


@pytest.fixture(scope="module")
def single_device_run(datasets, tmp_path_factory):
    trainer = Trainer(_config(datasets, tmp_path_factory.mktemp("ref"), steps=4))
    return trainer, trainer.fit(progress=False)


@pytest.fixture(scope="module")
def single_device_losses(single_device_run):
    return [r["loss"] for r in single_device_run[1]]


@pytest.mark.parametrize("mesh,strategy", [("1x8", "replicated"), ("1x8", "slora"), ("1x8", "bdlora")])
def test_every_mesh_and_strategy_trains_like_one_device(datasets, tmp_path, single_device_losses, mesh, strategy):
    trainer = Trainer(_config(datasets, tmp_path, steps=4, mesh=mesh, strategy=strategy))
    losses = [r["loss"] for r in trainer.fit(progress=False)]
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5, atol=0)


def test_dense_lora_trains_alike_under_bdlora(datasets, tmp_path):
    ref = Trainer(_config(datasets, tmp_path / "a", kind="lora", rank=2, steps=3))
    sharded = Trainer(_config(datasets, tmp_path / "b", kind="lora", rank=2, steps=3, mesh="1x8", strategy="bdlora"))
    np.testing.assert_allclose([r["loss"] for r in sharded.fit(progress=False)],
                               [r["loss"] for r in ref.fit(progress=False)], rtol=1e-5, atol=0)


def test_resume_equals_uninterrupted_and_skips_an_unfinished_save(datasets, tmp_path):
    whole = [r["loss"] for r in Trainer(_config(datasets, tmp_path / "whole")).fit(progress=False)]
    cfg = _config(datasets, tmp_path / "split")
    first = Trainer(cfg).fit(steps=4, progress=False)
    checkpoints = tmp_path / "split" / "run" / "checkpoints"
    # a save of step 6 that was killed before it finished: orbax writes into a temporary directory first
    partial = checkpoints / "6.orbax-checkpoint-tmp-1234"
    shutil.copytree(checkpoints / "4", partial)
    resumed = Trainer(cfg).fit(progress=False)
    assert [r["step"] for r in resumed] == [5, 6]
    np.testing.assert_allclose([r["loss"] for r in first + resumed], whole, rtol=0, atol=0)


def test_each_adapter_gets_the_gradients_it_would_get_alone(datasets, tmp_path, single_device_run):
    together, records = single_device_run
    alone = Trainer(_config(datasets, tmp_path / "one", adapters={"upper": datasets["upper"]}, batch_size=4, steps=4))
    both_losses = [r["adapter_loss"]["upper"] for r in records]
    alone_losses = [r["adapter_loss"]["upper"] for r in alone.fit(progress=False)]
    np.testing.assert_allclose(both_losses, alone_losses, rtol=1e-6, atol=0)
    for key, (a, b) in alone.train_state.factors.items():
        a2, b2 = together.train_state.factors[key]
        np.testing.assert_allclose(np.asarray(a2[0]), np.asarray(a[0]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(b2[0]), np.asarray(b[0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,mesh,strategy", [("bdlora", "1x4", "bdlora"), ("lora", "1x2", "slora")])
def test_exported_adapters_serve_the_trained_math(datasets, tmp_path, kind, mesh, strategy):
    trainer = Trainer(_config(datasets, tmp_path, kind=kind, rank=8 if kind == "bdlora" else 2, steps=3,
                              mesh=mesh, strategy=strategy))
    trainer.fit(progress=False)
    paths = trainer.export()
    # the bank the trainer trains through equals the bank the server builds from the exported PEFT files
    bank = to_bank(trainer.train_state.factors, trainer.spec, trainer.layout)
    for i, adapter in enumerate(export(trainer.train_state.factors, trainer.spec, trainer.model_config, trainer.names)):
        for key, (a, b) in slot_arrays(adapter, trainer.layout).items():
            np.testing.assert_allclose(np.asarray(bank[key][0][i + 1]), a, rtol=0, atol=1e-6)
            np.testing.assert_allclose(np.asarray(bank[key][1][i + 1]), b, rtol=0, atol=1e-6)
    engine = Engine.from_pretrained(MODEL, mesh=mesh, strategy=strategy, max_loras=2, max_lora_rank=trainer.layout.max_rank)
    inputs = trainer.batch(0).inputs
    rows = [list(np.asarray(inputs)[0][:12]), list(np.asarray(inputs)[-1][:12])]
    for name, path in paths.items():
        engine.add_adapter(name, path)
    served = engine.batch_logits(rows, list(paths))
    slots = jax.device_put(np.array([1, 2] + [0] * (-2 % trainer.plan.data_size), np.int32))
    from bdlora_jax.model.llama import AdapterBatch, forward

    tokens = np.zeros((len(slots), 12), np.int32)
    tokens[:2] = rows
    logits, _ = jax.jit(forward, static_argnums=0)(trainer.graphdef, trainer.state, jnp.asarray(tokens),
                                                   jnp.zeros(len(slots), jnp.int32), None, AdapterBatch(bank, slots))
    for i in range(2):
        np.testing.assert_allclose(served[i], np.asarray(logits)[i], rtol=0, atol=1e-5)


def test_config_file_and_overrides(tmp_path, datasets):
    path = tmp_path / "train.yaml"
    path.write_text(f"model: demo\nadapters: {{upper: {datasets['upper']}}}\nrank: 4\nbatch_size: 4\n")
    cfg = load_config(path, ["rank=8", "mesh=1x8", "adapters.reverse=" + datasets["reverse"], "kind=bdlora"])
    assert (cfg.rank, cfg.mesh, cfg.kind, set(cfg.adapters)) == (8, "1x8", "bdlora", {"upper", "reverse"})
    with pytest.raises(SystemExit, match="unknown field 'rnak'"):
        load_config(path, ["rnak=8"])


def test_config_values_take_their_field_types_or_exit_naming_field_and_source(tmp_path, datasets):
    path = tmp_path / "train.yaml"  # YAML 1.1 reads 3e-3 and 1e2 as strings, 32 as an int
    path.write_text(f"adapters: {{upper: {datasets['upper']}}}\nlearning_rate: 3e-3\nsteps: 1e2\nbatch_size: 4\n")
    cfg = load_config(path, ["alpha=32", "weight_decay=1e-2", "mesh=1x8"])
    assert (cfg.learning_rate, cfg.steps, cfg.alpha, cfg.weight_decay, cfg.mesh) == (0.003, 100, 32.0, 0.01, "1x8")
    assert type(cfg.steps) is int and type(cfg.alpha) is float
    for override, message in [("steps=ten", "override 'steps=ten': steps='ten': expected an integer"),
                              ("rank=2.5", "rank=2.5: expected an integer"),
                              ("packing=maybe", "packing='maybe': expected true or false"),
                              ("learning_rate=true", "learning_rate=True: expected a number"),
                              ("target_modules=q_proj", "target_modules='q_proj': expected a list of names")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            load_config(path, [override])
    path.write_text("adapters: {upper: [1, 2]}\nbatch_size: 4\n")
    with pytest.raises(SystemExit, match=re.escape(f"{path}: adapters.upper=[1, 2]: expected a string")):
        load_config(path, [])
    with pytest.raises(ValueError, match="batch_size=3 must be a multiple of the 2 adapters"):
        TrainConfig(adapters=datasets, batch_size=3)
    with pytest.raises(ValueError, match="unknown module"):
        TrainConfig(adapters=datasets, target_modules=("w1",))


def test_lora_dropout_is_the_same_on_every_mesh(datasets, tmp_path, single_device_losses):
    # warm-up starts at learning rate 0, so B is nonzero (and dropout visible in the loss) from step 3 on
    one = Trainer(_config(datasets, tmp_path / "one", steps=4, dropout=0.3)).fit(progress=False)
    sharded = Trainer(_config(datasets, tmp_path / "eight", steps=4, dropout=0.3, mesh="2x4",
                              strategy="slora")).fit(progress=False)
    assert abs(one[2]["loss"] - single_device_losses[2]) > 1e-4
    np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in one], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        TrainConfig(adapters=datasets, dropout=1.0)


def test_shipped_training_config_reads_with_its_data_command(tmp_path):
    from pathlib import Path

    from bdlora_jax.demo.tasks import write_datasets

    root = Path(__file__).parent.parent
    cfg = load_config(root / "configs" / "train" / "demo_tasks.yaml", ["steps=2"])
    assert (cfg.kind, cfg.nblocks, set(cfg.adapters), cfg.steps) == ("bdlora", 8, {"reverse", "double"}, 2)
    paths = write_datasets(tmp_path, n=5, tasks=tuple(cfg.adapters))
    assert next(json.loads(line)["completion"] for line in paths["reverse"].read_text().splitlines()) == \
        json.loads(paths["reverse"].read_text().splitlines()[0])["prompt"][:-1][::-1]
