"""Entry points keep freed host memory: a large buffer freed by one thread serves the next, not fresh pages."""

import os
import subprocess
import sys

import pytest

# In a worker thread (as XLA's are), allocates, writes and frees 64 MiB (16,384 pages) twice with glibc's malloc,
# and prints the page faults of the second round.
PROGRAM = """
import ctypes, ctypes.util, resource, sys, threading
from bdlora_jax.host_memory import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20
faults = []
def rounds():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = libc.malloc(SIZE)
        ctypes.memset(buffer, 1, SIZE)
        libc.free(buffer)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(kept, faults[1])
"""


def faults_of_second_round(env: dict) -> tuple[bool, int]:
    """Whether the memory was kept, and the page faults of the second allocation, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    kept, faults = done.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc options")
def test_freed_buffers_are_reused_and_the_opt_out_returns_them():
    env = {k: v for k, v in os.environ.items() if k != "BDLORA_RETURN_FREED_MEMORY"}
    kept, faults = faults_of_second_round(env)
    assert kept and faults < 100, faults
    returned, faults = faults_of_second_round({**env, "BDLORA_RETURN_FREED_MEMORY": "1"})
    assert not returned and faults >= 16384, faults


# Runs an entry point with --help, recording whether numpy or jax (whose threads take malloc arenas of their own)
# were imported when it asked to keep freed memory.
ENTRY_POINT = """
import runpy, sys
import bdlora_jax.host_memory as host_memory
calls = []
keep = host_memory.keep_freed_memory
def recording_keep():
    calls.append(sorted(m for m in ("numpy", "jax") if m in sys.modules))
    return keep()
host_memory.keep_freed_memory = recording_keep
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(calls, file=sys.stderr)
"""


@pytest.mark.parametrize("module", ["bdlora_jax.bench", "bdlora_jax.train", "bdlora_jax.serve"])
def test_entry_points_keep_freed_memory_before_numpy_or_jax_start_threads(module):
    done = subprocess.run([sys.executable, "-c", ENTRY_POINT, module], capture_output=True, text=True, check=True)
    assert done.stderr.strip().splitlines()[-1] == "[[]]", done.stderr


# Runs a step with 16 MiB temporaries ten times with synchronous CPU dispatch, and prints the most heap still in use
# right after a step returned beyond what was in use before it.
STEPS = """
import ctypes, ctypes.util
from bdlora_jax.host_memory import keep_freed_memory, run_cpu_steps_synchronously
keep_freed_memory()
run_cpu_steps_synchronously()
import jax, jax.numpy as jnp
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
step = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ jnp.cos(x)))
x = jnp.full((2048, 2048), 0.5, jnp.float32)
jax.block_until_ready(step(x))
held = []
for _ in range(10):
    before = libc.mallinfo2().uordblks
    jax.block_until_ready(step(x))
    held.append(libc.mallinfo2().uordblks - before)
print(max(held))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_a_synchronous_cpu_step_returns_with_its_temporaries_freed():
    done = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) < 4 << 20, done.stdout


# Runs a training entry point until it asks for synchronous CPU dispatch, and records whether JAX had created its
# CPU backend by then (the setting applies only to a backend created after it).
TRAINING_ENTRY = """
import runpy, sys
import bdlora_jax.host_memory as host_memory
def recording():
    from jax._src import xla_bridge
    print("backend created:", xla_bridge.backends_are_initialized(), file=sys.stderr)
    raise SystemExit(0)
host_memory.run_cpu_steps_synchronously = recording
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("argv", [["bdlora_jax.train", "--config", "configs/train/demo_tasks.yaml"],
                                  ["bdlora_jax.bench", "train", "--model", "demo", "--steps", "0"]])
def test_training_entry_points_run_cpu_steps_synchronously_from_the_start(argv):
    done = subprocess.run([sys.executable, "-c", TRAINING_ENTRY, *argv], capture_output=True, text=True, check=True)
    assert done.stderr.strip().splitlines()[-1] == "backend created: False", done.stderr
