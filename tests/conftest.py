"""Test session setup: 8 emulated CPU devices (set before jax is imported) and shared tiny models."""

import os

# Compile-time optimisation off for the CPU test runs: the suite is dominated by compiling many small
# programs, and every numeric check compares against a reference within a tolerance.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
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
