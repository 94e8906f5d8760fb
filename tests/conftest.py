"""Test session setup: 8 emulated CPU devices (set before jax is imported) and shared tiny models."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache per test session, shared by the xdist workers and every subprocess the
# tests start (servers, guides, bench commands): the suite compiles the same small programs many times.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bdlora_jax_test_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "hf_tiny"
MESHES = ("1x1", "1x2", "1x4", "1x8", "2x4")
STRATEGIES = ("replicated", "slora", "bdlora")


@pytest.fixture(scope="session")
def hf_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def reference() -> dict:
    with np.load(FIXTURES / "reference.npz") as data:
        return {k: data[k] for k in data.files}
