"""Keep freed host memory for reuse: XLA on the CPU allocates every step's buffers anew, and fresh pages fault.

A compiled step's temporaries are allocated at each call and freed after it. glibc serves allocations this large
with mmap from per-thread arenas and returns them to the kernel on free, so every step touches gigabytes of fresh
pages again: about a million page faults (a fifth of the step) for a training step at real shapes. One arena, no
mmap and no trimming make freed buffers serve the next step. Entry points call this before numpy or jax start
threads (a thread that allocated first would keep an arena of its own, where large blocks are still mapped afresh).

Training entry points also run CPU computations synchronously (`run_cpu_steps_synchronously`): with asynchronous
dispatch a step's outputs can be ready while its temporaries are not yet freed, so the next step, launched at once,
allocated its own beside them and the heap grew by a whole step's temporaries (at real shapes one step of 12 s
instead of 5, in about half of the short benchmark runs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = -1  # mallopt's int becomes a size_t: -1 is the largest threshold, so the heap is never trimmed
OPT_OUT = "BDLORA_RETURN_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Set glibc's malloc to one arena, no mmap and no trimming; False where it cannot (not glibc) or opted out."""
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl, macOS): its malloc takes no such options
        return False
    done = all(libc.mallopt(option, value) == 1
               for option, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM)))
    if not done:
        log.warning("glibc refused a malloc option: freed host memory goes back to the kernel")
    return done


def run_cpu_steps_synchronously() -> None:
    """Run JAX's CPU computations on the calling thread, so each returns with its temporaries freed.

    JAX reads the setting when it creates its CPU backend, so it applies only if called before the first computation.
    Training calls it (steps of seconds gain nothing from dispatching ahead); serving keeps asynchronous dispatch."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
