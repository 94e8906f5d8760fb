"""The shipped demo: trained task adapters answer held-out words exactly under every strategy on 8 devices."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bdlora_jax.bench.demo_accuracy import demo_accuracy
from bdlora_jax.demo import COMPRESSED_DIR, MODEL_DIR, demo_adapters, is_demo_model, resolve_model_path
from bdlora_jax.demo.tasks import ADAPTER_TASKS, caesar, examples

ROOT = Path(__file__).parent.parent


def test_demo_ships_the_four_task_adapters_two_of_them_bdlora_with_8_blocks():
    adapters = demo_adapters()
    assert sorted(adapters) == sorted(ADAPTER_TASKS)
    nblocks = {name: (json.loads((path / "adapter_config.json").read_text()).get("use_bdlora") or {}).get("nblocks", 1)
               for name, path in adapters.items()}
    assert sorted(n for n in nblocks.values() if n == 8) == [8, 8]


def test_the_name_demo_resolves_to_the_shipped_model_and_any_other_to_itself():
    assert resolve_model_path("demo") == MODEL_DIR and resolve_model_path(Path("demo")) == MODEL_DIR
    assert resolve_model_path("models/demo") == Path("models/demo")
    assert is_demo_model("demo") and not is_demo_model("./demo") and not is_demo_model(None)


def test_tasks_have_exact_answers_and_held_out_words_differ():
    assert caesar("xyz") == "abc"
    train = {e["prompt"] for e in examples("reverse", 4000, seed=0)}
    held = [e for e in examples("reverse", 100, seed=1)]
    assert held[0]["completion"] == held[0]["prompt"][:-1][::-1]
    assert sum(e["prompt"] in train for e in held) < 10


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["replicated", "slora"])
def test_demo_accuracy_on_eight_devices(strategy):
    report = demo_accuracy(mesh="1x8", strategy=strategy, n=20)
    assert all(accuracy >= 0.9 for accuracy in report["accuracy"].values()), report


@pytest.mark.slow
def test_bench_demo_accuracy_command_bdlora():
    out = subprocess.run(
        [sys.executable, "-m", "bdlora_jax.bench", "demo-accuracy", "--mesh", "1x8", "--strategy", "bdlora",
         "--n", "20", "--json"], capture_output=True, text=True, check=True, cwd=ROOT,
    )
    report = json.loads(out.stdout)
    assert set(report["accuracy"]) == set(ADAPTER_TASKS)
    assert all(accuracy >= 0.9 for accuracy in report["accuracy"].values()), report


@pytest.mark.slow
def test_compressed_demo_bank_keeps_95_percent_of_the_accuracy():
    """The shipped bank (the four task adapters at the rank docs/guides/compress-a-collection.md recommends)
    served compressed, against the same adapters uncompressed, on the same held-out words."""
    manifest = json.loads((COMPRESSED_DIR / "manifest.json").read_text())
    assert (manifest["method"], manifest["rank"], manifest["clusters"]) == ("full", 32, 1)
    assert "--rank 32" in (ROOT / "docs" / "guides" / "compress-a-collection.md").read_text()
    plain = demo_accuracy(strategy="replicated", n=100)["accuracy"]
    compressed = demo_accuracy(strategy="replicated", n=100, max_lora_rank=4, compressed_bank=COMPRESSED_DIR)
    assert compressed["setup"]["compressed"] and set(compressed["accuracy"]) == set(plain)
    for name, accuracy in plain.items():
        assert compressed["accuracy"][name] >= 0.95 * accuracy, (name, compressed["accuracy"], plain)
