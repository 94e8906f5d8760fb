"""`python -m bdlora_jax.launch`: the env contract, prefixed output, and that every way the launcher stops
(a failing child, SIGTERM, --timeout) leaves no child running. Children are tiny Python scripts; no jax."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bdlora_jax import launch

ROOT = Path(__file__).resolve().parents[1]

# Every child script starts with this: its rank, and a helper that publishes its pid (atomically) for the test.
PRELUDE = """
import json, os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
rank = int(os.environ["BDLORA_PROCESS_ID"])

def publish_pid():
    tmp = out / f".pid{rank}"
    tmp.write_text(str(os.getpid()))
    tmp.rename(out / f"pid{rank}")

def wait_for_pid1():
    deadline = time.monotonic() + 15
    while not (out / "pid1").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
"""
SLEEPER = "publish_pid()\ntime.sleep(60)\n"


def child(tmp_path: Path, body: str) -> list[str]:
    """Write a child script (PRELUDE + body) and return the launcher's command for it, after `--`."""
    script = tmp_path / "child.py"
    script.write_text(PRELUDE + body)
    return ["--", "python", str(script), str(tmp_path)]


def run_launcher(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `python -m bdlora_jax.launch ARGS` from the repository root and capture its output."""
    return subprocess.run([sys.executable, "-m", "bdlora_jax.launch", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def wait_for_pids(tmp_path: Path, ranks: list[int], within: float = 15) -> list[int]:
    """The pids the children of `ranks` published, waiting for them to appear."""
    deadline = time.monotonic() + within
    files = [tmp_path / f"pid{r}" for r in ranks]
    while not all(f.exists() for f in files):
        assert time.monotonic() < deadline, f"children did not start: {[f.name for f in files if not f.exists()]}"
        time.sleep(0.02)
    return [int(f.read_text()) for f in files]


def assert_gone(pids: list[int], within: float = 3) -> None:
    """Each pid is no longer a process within a short wait; a survivor is killed, then the test fails."""
    deadline = time.monotonic() + within
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _exists(pid)]
        time.sleep(0.02)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"children still running: {alive}"


def _exists(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_children_see_the_env_contract(tmp_path):
    """Each child gets the four BDLORA_ variables: distinct ids 0..P-1, one coordinator address, P and K."""
    body = "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(('BDLORA_', 'JAX_PLATFORMS'))}))\n"
    result = run_launcher("--num-processes", "3", "--cpu-devices-per-process", "2", *child(tmp_path, body))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, lines
    envs = {int(line[2]): json.loads(line.split(" ", 1)[1]) for line in lines}
    assert sorted(envs) == [0, 1, 2]
    assert [env["BDLORA_PROCESS_ID"] for _, env in sorted(envs.items())] == ["0", "1", "2"]
    addresses = {env["BDLORA_COORDINATOR_ADDRESS"] for env in envs.values()}
    assert len(addresses) == 1
    host, port = addresses.pop().split(":")
    assert host == "127.0.0.1" and int(port) > 0
    for env in envs.values():
        assert env["BDLORA_NUM_PROCESSES"] == "3"
        assert env["BDLORA_CPU_DEVICES_PER_PROCESS"] == "2"
        assert env["JAX_PLATFORMS"] == "cpu"


def test_coordinator_port_flag(tmp_path):
    """--coordinator-port fixes the port of the address every child sees."""
    body = "print(os.environ['BDLORA_COORDINATOR_ADDRESS'])\n"
    result = run_launcher("--num-processes", "2", "--coordinator-port", "12345", *child(tmp_path, body))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(result.stdout.splitlines()) == ["[p0] 127.0.0.1:12345", "[p1] 127.0.0.1:12345"]


def test_output_is_prefixed_per_process(tmp_path):
    """stdout and stderr lines of child i both reach the launcher's stdout as `[p<i>] line`."""
    body = "print(f'out {rank}')\nprint(f'err {rank}', file=sys.stderr)\nsys.stdout.write(f'last {rank}')\n"
    result = run_launcher("--num-processes", "2", *child(tmp_path, body))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines) == sorted(f"[p{i}] {word} {i}" for i in range(2) for word in ("out", "err", "last"))
    assert [line for line in lines if line.startswith("[p0]")] == ["[p0] out 0", "[p0] err 0", "[p0] last 0"]


def test_failing_child_stops_the_others_and_sets_the_exit_code(tmp_path):
    """When p0 exits 3 the launcher exits 3 and its sleeping sibling p1 is gone."""
    body = ("if rank == 0:\n"
            "    wait_for_pid1()\n"
            "    sys.exit(3)\n" + SLEEPER)
    start = time.monotonic()
    result = run_launcher("--num-processes", "2", *child(tmp_path, body))
    assert result.returncode == 3, result.stdout + result.stderr
    assert time.monotonic() - start < launch.GRACE_SECONDS + 10
    assert "p0 exited with 3" in result.stderr
    assert_gone(wait_for_pids(tmp_path, [1]))


def test_child_ignoring_sigterm_is_killed(tmp_path, monkeypatch):
    """A sibling that ignores SIGTERM is SIGKILLed after the grace period (run in-process with a short grace)."""
    monkeypatch.setattr(launch, "GRACE_SECONDS", 0.3)
    body = ("if rank == 0:\n"
            "    wait_for_pid1()\n"
            "    sys.exit(5)\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER)
    start = time.monotonic()
    assert launch.main(["--num-processes", "2", "--timeout", "20", *child(tmp_path, body)]) == 5
    assert time.monotonic() - start < 10, "the launcher waited for the child instead of killing it"
    assert_gone(wait_for_pids(tmp_path, [1]))


def test_sigterm_to_launcher_stops_all_children(tmp_path):
    """SIGTERM to the launcher stops every child, and the launcher exits 128 + SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "bdlora_jax.launch", "--num-processes", "2",
                             *child(tmp_path, SLEEPER)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pids = wait_for_pids(tmp_path, [0, 1])
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=launch.GRACE_SECONDS + 10)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM
    assert_gone(pids)


def test_timeout_exits_124_and_stops_children(tmp_path):
    """--timeout kills every child after S seconds and the launcher exits 124."""
    result = run_launcher("--num-processes", "2", "--timeout", "1", *child(tmp_path, SLEEPER))
    assert result.returncode == 124, result.stdout + result.stderr
    assert "timed out" in result.stderr
    assert_gone(wait_for_pids(tmp_path, [0, 1]))


@pytest.mark.parametrize(("args", "flag", "value"), [
    (["--num-processes", "0", "--", "true"], "--num-processes", "'0'"),
    (["--num-processes", "2", "--cpu-devices-per-process", "0", "--", "true"], "--cpu-devices-per-process", "'0'"),
    (["--num-processes", "2", "--timeout", "-1", "--", "true"], "--timeout", "'-1'"),
    (["--num-processes", "2", "--"], "command", "none"),
])
def test_bad_arguments_are_refused(args, flag, value):
    """argparse refuses bad values with exit code 2 and a message naming the flag and the value."""
    result = run_launcher(*args)
    assert result.returncode == 2
    error = result.stderr.splitlines()[-1]
    assert flag in error and value in error, error


def test_command_resolution():
    """Project subcommands run as `python -m bdlora_jax.<word>`; `python` is this interpreter; others as given."""
    assert launch.resolve_command(["serve", "--port", "1"]) == [sys.executable, "-m", "bdlora_jax.serve", "--port", "1"]
    assert launch.resolve_command(["bench", "train"]) == [sys.executable, "-m", "bdlora_jax.bench", "train"]
    assert launch.resolve_command(["python", "x.py"]) == [sys.executable, "x.py"]
    assert launch.resolve_command(["echo", "serve"]) == ["echo", "serve"]
