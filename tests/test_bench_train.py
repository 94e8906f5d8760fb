"""`bench train` on the demo model: packed, loss-chunked training reports real tokens/s, the step's memory, and a
step compiled once; bad --lengths exit naming the option."""

import json

import pytest

from bdlora_jax.bench.cli import main


def test_bench_train_reports_tokens_memory_and_one_compilation(capsys):
    main(["train", "--model", "demo", "--adapters", "2", "--batch", "4", "--seq-len", "16", "--lengths",
          "uniform:4-17", "--packing", "--loss-chunk", "8", "--examples", "16", "--warmup", "1", "--steps", "2",
          "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["real_tokens_per_s"] > 0 and 0 < report["row_fill"] <= 1
    assert len(report["step_seconds"]) == 2
    assert sum(report["step_seconds"]) == pytest.approx(2 * report["seconds_per_step"])
    assert report["peak_bytes"] >= report["temp_bytes"] > 0
    assert (report["step_compilations"], report["compilations_in_timed_steps"]) == (1, 0)


@pytest.mark.parametrize("lengths,message", [("uniform:4", "expected 'fixed' or 'uniform:LOW-HIGH'"),
                                             ("uniform:4-40", "do not fit --seq-len 16")])
def test_bench_train_rejects_bad_lengths(lengths, message):
    with pytest.raises(SystemExit, match=message):
        main(["train", "--model", "demo", "--seq-len", "16", "--lengths", lengths, "--steps", "0"])
