"""Two processes × 4 CPU devices (jax.distributed over gloo on 127.0.0.1, started by bdlora_jax.launch) compute what
one process with 8 devices computes: mixed-batch logits on 1x8 and 2x4 for each strategy, 10 training steps with
a resume from the orbax checkpoint both processes saved, and the collectives `bench comm` counts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES

from bdlora_jax.train.config import TrainConfig
from bdlora_jax.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent / "multihost"))
from mixed_batch_logits import mixed_batch_logits

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parent / "multihost"


def launch(*command: str, timeout: float = 240) -> list[str]:
    """Run command on 2 local processes of 4 CPU devices; its output lines, each prefixed [p0] or [p1]."""
    result = subprocess.run([sys.executable, "-m", "bdlora_jax.launch", "--num-processes", "2",
                             "--cpu-devices-per-process", "4", "--timeout", str(timeout), "--", *command],
                            check=False, capture_output=True, text=True, timeout=timeout + 30)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout.splitlines()


def test_two_processes_give_the_single_process_logits_of_a_mixed_batch(tmp_path):
    launch("python", str(SCRIPTS / "mixed_batch_logits.py"), "--out", str(tmp_path))
    for mesh in ("1x8", "2x4"):
        for strategy in ("replicated", "slora", "bdlora"):
            want = np.concatenate(mixed_batch_logits(mesh, strategy))
            got = np.load(tmp_path / f"{mesh}-{strategy}.npy")
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{mesh} {strategy}")


def _training(tmp_path: Path, out: str) -> dict:
    data = {}
    for task, fn in (("upper", str.upper), ("reverse", lambda s: s[::-1])):
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"{w} {v}=", "completion": fn(f"{w} {v}")}) + "\n"
                                for w in ("alpha", "beta", "mesh", "jax") for v in ("lora", "tensor", "block")))
        data[task] = str(path)
    return dict(model=str(FIXTURES / "model"), adapters=data, kind="bdlora", nblocks=8, rank=8, alpha=16.0,
                batch_size=8, seq_len=32, steps=10, learning_rate=0.003, warmup_steps=2, eval_every=100,
                save_every=5, keep_last=3, eval_fraction=0.0, mesh="2x4", out_dir=str(tmp_path / out))


def test_training_on_two_processes_gives_the_single_process_losses_and_resumes(tmp_path):
    single = Trainer(TrainConfig(**_training(tmp_path, "single"))).fit(progress=False)
    fields = _training(tmp_path, "multi")
    overrides = [f"{k}={v}" for k, v in fields.items() if k != "adapters"]
    overrides += [f"adapters.{name}={path}" for name, path in fields["adapters"].items()]
    launch("train", *overrides, "--stop-at-step", "5")
    lines = launch("train", *overrides)  # resumes from the checkpoint of step 5
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))  # written once, by process 0
    for got, want in zip(records, single):
        np.testing.assert_allclose([got["loss"], *got["adapter_loss"].values()],
                                   [want["loss"], *want["adapter_loss"].values()], atol=1e-5, rtol=0)
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir()) == ["10", "5"]
    final = [line for line in lines if line.startswith("[p0] {")]
    assert len(final) == 1 and not any(line.startswith("[p1] {") for line in lines)
    assert json.loads(final[0][5:])["adapters"].keys() == {"upper", "reverse"}


def test_bench_comm_on_two_processes_reports_the_single_process_collectives():
    command = ["bench", "comm", "--model", "tiny", "--mesh", "2x4", "--strategy", "slora", "--json"]
    reports = [line[5:] for line in launch(*command) if line[5:].startswith("{")]
    single = subprocess.run([sys.executable, "-m", "bdlora_jax.bench", *command[1:]], capture_output=True, text=True,
                            timeout=240, check=True).stdout
    assert len(reports) == 1  # process 0 reports
    assert json.loads(reports[0]) == json.loads(single)
