"""Shared test material: the fixture checkpoint, the mesh × strategy matrix, a one-layer model config, and
builders and checks for engines that serve the fixture PEFT adapters (imported by test files as `helpers`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bdlora_jax import Engine
from bdlora_jax.config import ModelConfig
from bdlora_jax.engine.scheduler import Scheduler
from bdlora_jax.errors import AdapterError

FIXTURES = Path(__file__).parent / "fixtures" / "hf_tiny"  # 2-layer Llama, PEFT adapters, reference logits
MESHES = ("1x1", "1x2", "1x4", "1x8", "2x4")
STRATEGIES = ("replicated", "slora", "bdlora")

# One layer (every adapted module is there) with 4 kv heads: on 1x8 they fall back to replicated, so bdlora's
# k/v B keeps all 8 blocks on every device.
ONE_LAYER_CONFIG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8,
                               num_kv_heads=4, head_dim=8)

# ------------------------------------------------------------------------------ fixture PEFT adapters

FIXTURE_ADAPTERS = ("lora_r8", "lora_rs_r4_qv", "bdlora_nb2_r8", "bdlora_nb4_r8")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ATOL = 1e-4
GOOD = "good"  # lora_rs_r4_qv, registered before every refusal


def lora_tensor_name(layer: int, module: str, factor: str) -> str:
    """The PEFT safetensors name of one LoRA factor ("A" or "B") of one module in one layer."""
    parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{factor}.weight"


@contextmanager
def running_scheduler(engine: Engine, warm_up: bool = True) -> Iterator[tuple[Engine, Scheduler]]:
    """(engine, its Scheduler thread) as the server runs them: warmed up unless told not to, started, stopped on exit."""
    scheduler = Scheduler(engine)
    if warm_up:
        scheduler.warm_up()
    scheduler.start()
    try:
        yield engine, scheduler
    finally:
        scheduler.stop()


def make_engine(hf_dir: Path, **kwargs) -> Engine:
    """An engine on the fixture model: 1x1 bdlora, max_loras=4, max_lora_rank=8, float32, unless kwargs say else."""
    opts = dict(mesh="1x1", strategy="bdlora", max_loras=4, max_lora_rank=8, dtype="float32")
    opts.update(kwargs)
    return Engine.from_pretrained(hf_dir / "model", **opts)


def prompts(reference) -> list[list[int]]:
    """The three reference prompts as token lists."""
    return [list(map(int, p)) for p in reference["prompts"]]


def assert_serves(eng: Engine, name: str | None, reference, ref_adapter: str | None) -> None:
    """All three reference prompts under `name` (one batch) match logits_<ref_adapter> within ATOL."""
    out = np.stack(eng.batch_logits(prompts(reference), [name] * 3))
    expected = reference["logits_base" if ref_adapter is None else f"logits_{ref_adapter}"]
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0, err_msg=f"adapter {name!r} ({ref_adapter})")


def copy_adapter(hf_dir: Path, fixture: str, dest: Path) -> Path:
    """A fresh copy of a fixture adapter directory at dest (replacing what is there); returns dest."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(hf_dir / "adapters" / fixture, dest)
    return dest


def edit_config(path: Path, **changes) -> None:
    """Update fields of the adapter_config.json in an adapter directory."""
    config = json.loads((path / ADAPTER_CONFIG_FILE).read_text())
    config.update(changes)
    (path / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))


def edit_tensors(path: Path, fn) -> None:
    """Rewrite the safetensors of an adapter directory after fn changed its name -> array dict in place."""
    tensors = load_file(str(path / ADAPTER_WEIGHTS_FILE))
    fn(tensors)
    save_file(tensors, str(path / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


def refuse_then_recover(eng: Engine, reference, hf_dir: Path, bad_path: Path, name: str, fixture: str,
                        error=AdapterError, must_mention=()) -> str:
    """add_adapter(name, bad_path) raises `error` naming every string in must_mention; the engine is unchanged;
    then bad_path is restored from `fixture`, re-added under the same name and served exactly. Returns the message."""
    assert GOOD in eng.adapters
    before = (eng.adapters, dict(eng.pool.resident), eng.pool.loads, eng.pool.evictions)
    with pytest.raises(error) as info:
        eng.add_adapter(name, bad_path)
    message = str(info.value)
    for fragment in must_mention:
        assert str(fragment) in message, f"{fragment!r} not in error message: {message}"
    # nothing changed, nothing half-loaded
    assert name not in eng.adapters
    assert (eng.adapters, dict(eng.pool.resident), eng.pool.loads, eng.pool.evictions) == before
    assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")
    with pytest.raises(KeyError):
        eng.logits(prompts(reference)[0], adapter=name)
    # a fixed adapter under the same name (and the same path) registers and serves exactly
    copy_adapter(hf_dir, fixture, bad_path)
    eng.add_adapter(name, bad_path)
    assert name in eng.adapters
    assert_serves(eng, name, reference, fixture)
    assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")
    eng.remove_adapter(name)
    assert name not in eng.adapters
    return message


def penalized_reference(logits, bias: dict[int, float], prompt, output, repetition: float, frequency: float,
                        presence: float) -> np.ndarray:
    """vLLM's logit processing of one row in numpy: logit_bias, then the repetition (prompt + output), frequency
    and presence (output) penalties."""
    logits = np.array(logits, np.float64)
    for token, value in bias.items():
        logits[token] += value
    counts = np.bincount(np.asarray(output, int), minlength=len(logits))
    seen = (np.bincount(np.asarray(prompt, int), minlength=len(logits)) > 0) | (counts > 0)
    logits = np.where(seen & (logits > 0), logits / repetition, np.where(seen, logits * repetition, logits))
    return logits - frequency * counts - presence * (counts > 0)
