"""Test session setup (8 emulated CPU devices and a persistent compilation cache, set before jax is imported) and
the pytest fixtures several test files share."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache per test session, shared by the xdist workers and every subprocess the
# tests start (servers, guides, bench commands): the suite compiles the same small programs many times.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bdlora_jax_test_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES, GOOD, assert_serves, make_engine

from bdlora_jax.checkpoint import load_model_config
from bdlora_jax.server import create_app


@pytest.fixture(scope="session")
def hf_dir() -> Path:
    """The fixture checkpoint: model/, model_tied/, adapters/ and reference.npz."""
    return FIXTURES


@pytest.fixture(scope="session")
def reference() -> dict:
    """Reference prompts and the transformers / PEFT logits of the fixture model and adapters."""
    with np.load(FIXTURES / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def eng(hf_dir, reference):
    """1x1 bdlora engine, max_loras=4, max_lora_rank=8, with GOOD registered and checked."""
    engine = make_engine(hf_dir)
    engine.add_adapter(GOOD, hf_dir / "adapters" / "lora_rs_r4_qv")
    assert_serves(engine, GOOD, reference, "lora_rs_r4_qv")
    return engine


@pytest.fixture(scope="module")
def model_config(hf_dir):
    """The fixture model's ModelConfig."""
    return load_model_config(hf_dir / "model")


@pytest.fixture(scope="module")
def engine(served):
    """The engine of a module's `served` fixture: (engine, its running Scheduler)."""
    return served[0]


@pytest.fixture(scope="module")
def scheduler(served):
    """The Scheduler thread of a module's `served` fixture."""
    return served[1]


@pytest.fixture(scope="module")
def app(served):
    """The app over a module's `served` engine, its base model served as "demo" (no API key, no lora root)."""
    return create_app(*served, "demo")
