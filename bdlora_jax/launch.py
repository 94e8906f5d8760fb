"""`python -m bdlora_jax.launch`: start P local processes of one command as a multi-controller JAX job on CPU.

Each child gets BDLORA_COORDINATOR_ADDRESS, BDLORA_NUM_PROCESSES, BDLORA_PROCESS_ID and
BDLORA_CPU_DEVICES_PER_PROCESS (read by the code that calls jax.distributed.initialize) and JAX_PLATFORMS=cpu.
Each child's stdout and stderr lines are relayed to our stdout prefixed `[p<i>] `. The first child to fail, a
SIGINT/SIGTERM or --timeout stops all the others (SIGTERM to each process group, SIGKILL after GRACE_SECONDS);
no child is left running. Exit code: the failed child's (128 + N for signal N), 128 + N for a signal to the
launcher, 124 on --timeout, 127 when a command cannot be started, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

MODULES = ("serve", "train", "bench", "compress")
GRACE_SECONDS = 5.0
TIMEOUT_EXIT = 124
_PRINT_LOCK = threading.Lock()


def positive_int(text: str) -> int:
    """An argparse type for counts and ports: an integer >= 1 (argparse names the flag in its error)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    """An argparse type for --timeout: a number of seconds > 0 (argparse names the flag in its error)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of `python -m bdlora_jax.launch`."""
    p = argparse.ArgumentParser(prog="python -m bdlora_jax.launch", description=__doc__.splitlines()[0])
    p.add_argument("--num-processes", type=positive_int, required=True, metavar="P")
    p.add_argument("--cpu-devices-per-process", type=positive_int, default=1, metavar="K")
    p.add_argument("--coordinator-port", type=positive_int, default=None, metavar="PORT",
                   help="default: a free port on 127.0.0.1")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                   help=f"seconds before everything is killed and the launcher exits {TIMEOUT_EXIT}")
    p.add_argument("command", nargs=argparse.REMAINDER, help="after `--`: serve|train|bench|compress ARGS, or any command")
    return p


def resolve_command(command: list[str]) -> list[str]:
    """Turn `serve ...` etc. into `python -m bdlora_jax.serve ...` and `python` into this interpreter."""
    head, rest = command[0], command[1:]
    if head in MODULES:
        return [sys.executable, "-m", f"bdlora_jax.{head}", *rest]
    return [sys.executable, *rest] if head == "python" else command


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (bound to port 0 and released), for the coordinator."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relay(index: int, stream: IO[bytes]) -> None:
    """Copy one child's merged stdout/stderr to our stdout line by line, prefixed with its process index."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        with _PRINT_LOCK:
            sys.stdout.write(f"[p{index}] {line}\n")
            sys.stdout.flush()
    stream.close()


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(procs: list[subprocess.Popen], received: list[int], deadline: float | None) -> int:
    """Wait until all children exit 0, one fails, a signal arrives or the deadline passes; return our exit code."""
    while True:
        if received:
            print(f"launch: got signal {received[0]}, stopping all processes", file=sys.stderr)
            return 128 + received[0]
        codes = [p.poll() for p in procs]
        failed = [(i, exit_code(c)) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            print(f"launch: p{i} exited with {code}, stopping all processes", file=sys.stderr)
            return code
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() >= deadline:
            print("launch: timed out, stopping all processes", file=sys.stderr)
            return TIMEOUT_EXIT
        time.sleep(0.05)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every running child's process group, SIGKILL what is left after GRACE_SECONDS, and reap them all."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + GRACE_SECONDS
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for p in procs:
        p.wait()


def main(argv: list[str] | None = None) -> int:
    """Launch the processes, relay their output, stop them all at the first failure, and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command is required after `--`, got none")
    port = free_port() if args.coordinator_port is None else args.coordinator_port
    received: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []
    code = 127
    try:
        for i in range(args.num_processes):
            env = {**os.environ, "BDLORA_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                   "BDLORA_NUM_PROCESSES": str(args.num_processes), "BDLORA_PROCESS_ID": str(i),
                   "BDLORA_CPU_DEVICES_PER_PROCESS": str(args.cpu_devices_per_process),
                   "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
            procs.append(subprocess.Popen(resolve_command(command), env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
            readers.append(threading.Thread(target=relay, args=(i, procs[-1].stdout), daemon=True))
            readers[-1].start()
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        code = supervise(procs, received, deadline)
    except OSError as e:
        print(f"launch: cannot start {command[0]!r}: {e}", file=sys.stderr)
    finally:
        stop_all(procs)
        for t in readers:
            t.join(timeout=2)
        for s, handler in old.items():
            signal.signal(s, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
