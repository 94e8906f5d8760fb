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
