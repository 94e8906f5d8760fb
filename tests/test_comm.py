"""Collectives counted in the compiled HLO of the Llama-3.1-8B decode step on a 1x8 mesh.

The counts are per layer and every layer is the same, so the step is compiled with 2 of the model's 32 layers
(every other shape as in Llama-3.1-8B): the compile takes a sixteenth of the time and the per-layer counts are
those of the whole model."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bdlora_jax.comm import DecodeShape, compile_decode_step, count_collectives
from bdlora_jax.config import load_model_config_yaml
from bdlora_jax.configs import CONFIGS_DIR
from bdlora_jax.mesh import make_mesh
from bdlora_jax.sharding import make_plan

ROOT = Path(__file__).parent.parent
CONFIG_8B = CONFIGS_DIR / "models" / "llama-3.1-8b.yaml"
SHAPE = DecodeShape(batch=16, max_seq_len=1024, max_loras=8, rank=16, dtype="bfloat16")
LAYERS = 2


@pytest.fixture(scope="module")
def llama8b():
    config = load_model_config_yaml(CONFIG_8B)
    assert config.num_layers == 32
    return dataclasses.replace(config, num_layers=LAYERS)


@pytest.fixture(scope="module")
def base_counts(llama8b):
    plan = make_plan(make_mesh("1x8"), "bdlora", llama8b, SHAPE.rank)
    return count_collectives(compile_decode_step(llama8b, plan, SHAPE, with_lora=False).as_text())


def _with_lora(config, strategy):
    plan = make_plan(make_mesh("1x8"), strategy, config, SHAPE.rank)
    return count_collectives(compile_decode_step(config, plan, SHAPE, with_lora=True).as_text())


def test_base_model_has_two_all_reduces_per_layer(base_counts, llama8b):
    # 2 per layer (attention output, MLP output) plus one for the vocab-sharded embedding lookup; each is a
    # (batch, 1, hidden) bfloat16 all-reduce that the CPU backend promotes to float32 (4 bytes per element)
    count = 2 * llama8b.num_layers + 1
    bytes_ = count * SHAPE.batch * llama8b.hidden_size * 4
    assert base_counts == {"all-reduce": {"count": count, "bytes": bytes_, "promoted": count}}


@pytest.mark.parametrize("strategy", ["bdlora", "replicated"])
def test_bdlora_and_replicated_add_no_collectives(base_counts, llama8b, strategy):
    assert _with_lora(llama8b, strategy) == base_counts


def test_slora_adds_five_all_gathers_and_two_all_reduces_per_layer(base_counts, llama8b):
    counts = _with_lora(llama8b, "slora")
    layers, rank, rows = llama8b.num_layers, SHAPE.rank, SHAPE.batch
    assert counts["all-gather"] == {"count": 5 * layers, "bytes": 5 * layers * rows * rank * 4}
    extra_all_reduce = counts["all-reduce"]["count"] - base_counts["all-reduce"]["count"]
    assert extra_all_reduce == 2 * layers
    assert counts["all-reduce"]["promoted"] == base_counts["all-reduce"]["promoted"]  # the rank sums are float32
    assert counts["all-reduce"]["bytes"] - base_counts["all-reduce"]["bytes"] == 2 * layers * rows * rank * 4
    assert set(counts) == {"all-gather", "all-reduce"}


def test_count_collectives_parses_sync_async_and_tuple_results():
    hlo = "\n".join([
        "  %all-reduce.1 = f32[16,1,4096]{2,1,0} all-reduce(f32[16,1,4096]{2,1,0} %x), channel_id=1",
        "  %ag = bf16[16,16]{1,0} all-gather(bf16[16,2]{1,0} %y), dimensions={1}",
        "  %ars = (f32[4]{0}, f32[4]{0}) all-reduce-start(f32[4]{0} %z), channel_id=3",
        "  %ard = f32[4]{0} all-reduce-done((f32[4]{0}, f32[4]{0}) %ars)",
        "  %t = (f32[2]{0}, bf16[8]{0}) all-reduce(f32[2]{0} %a, bf16[8]{0} %b), to_apply=%region_0_promoted",
        "  %add = f32[4]{0} add(f32[4]{0} %p, f32[4]{0} %q)",
    ])
    assert count_collectives(hlo) == {
        "all-reduce": {"count": 3, "bytes": 16 * 4096 * 4 + 4 * 4 + (2 * 4 + 8 * 2), "promoted": 1},
        "all-gather": {"count": 1, "bytes": 16 * 16 * 2},
    }


def test_bench_comm_prints_one_json_object():
    out = subprocess.run(
        [sys.executable, "-m", "bdlora_jax.bench", "comm", "--model", str(CONFIGS_DIR / "models" / "tiny.yaml"),
         "--mesh", "1x4", "--strategy", "slora", "--rank", "8", "--batch", "4", "--seq-len", "64", "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    report = json.loads(out.stdout)
    assert report["extra"]["all-gather"]["count"] == 5 * 2
    assert report["extra"]["all-reduce"]["count"] == 2 * 2
    assert report["setup"]["strategy"] == "slora" and report["extra_per_layer"]["all-gather"] == 5.0
