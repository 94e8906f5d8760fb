"""`bench serve --json` runs every configuration side by side and reports ratios to base only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_bench_serve_prints_one_json_object_with_ratios(kv_cache):
    out = subprocess.run(
        [sys.executable, "-m", "bdlora_jax.bench", "serve", "--model", "demo", "--mesh", "1x2", "--strategy", "slora",
         "--batch", "4", "--prompt-len", "8", "--new-tokens", "3", "--adapters", "2,4", "--repeats", "1",
         "--kv-cache", kv_cache, "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    report = json.loads(out.stdout)
    assert list(report["results"]) == ["base only", "1 adapter", "2 adapters", "4 adapters"]
    assert report["results"]["base only"]["ratio_to_base"] == 1.0
    for entry in report["results"].values():
        assert entry["tokens_per_s"] > 0
        assert entry["ratio_to_base"] == entry["tokens_per_s"] / report["results"]["base only"]["tokens_per_s"]
    assert report["setup"] == {"model": "demo", "mesh": "1x2", "strategy": "slora", "batch": 4, "prompt_len": 8,
                               "new_tokens": 3, "rank": 16, "kv_cache": kv_cache, "dtype": "float32",
                               "platform": "cpu"}
