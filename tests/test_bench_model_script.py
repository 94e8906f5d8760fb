"""scripts/make_bench_model.py writes a random model with a numbered tokenizer and PEFT adapters that the engine
serves: every generated token has text, and each adapter holds random_adapter's factors (BD-LoRA with
--nblocks, served by bdlora on a 2-device mesh)."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from bdlora_jax import Engine
from bdlora_jax.adapters.peft_io import read_adapter
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.checkpoint import resolve_model_config
from bdlora_jax.tokenizer import numbered_tokenizer

ROOT = Path(__file__).parent.parent


def test_numbered_tokenizer_gives_every_id_a_word():
    tokenizer = numbered_tokenizer(1000)
    assert tokenizer.get_vocab_size() == 1000
    assert tokenizer.decode([0, 999, 42]) == "t0 t999 t42"
    assert tokenizer.encode("t7 t500").ids == [7, 500]


def test_script_writes_a_served_model_and_adapters(tmp_path):
    out = subprocess.run([sys.executable, "scripts/make_bench_model.py", "--out", str(tmp_path), "--model", "tiny",
                          "--adapters", "2", "--rank", "4", "--nblocks", "2", "--seed", "3"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["--model", str(tmp_path / "model"), "--lora-modules",
                           f"a0={tmp_path / 'adapters' / 'a0'}", f"a1={tmp_path / 'adapters' / 'a1'}"]
    config = resolve_model_config("tiny")
    for i in range(2):
        written = read_adapter(tmp_path / "adapters" / f"a{i}", config)
        expected = random_adapter(config, f"a{i}", rank=4, nblocks=2, seed=3 + i)
        for key, factors in expected.modules.items():
            np.testing.assert_array_equal(written.modules[key].a, factors.a)
            np.testing.assert_array_equal(written.modules[key].b, factors.b)
        assert written.nblocks == 2
    engine = Engine.from_pretrained(tmp_path / "model", mesh="1x2", strategy="bdlora", max_loras=2, max_lora_rank=4, max_batch=2, max_seq_len=32)
    engine.add_adapter("a1", tmp_path / "adapters" / "a1")
    base, adapted = engine.generate([[1, 2, 3]] * 2, adapters=[None, "a1"], max_tokens=6, ignore_eos=True)
    for completion in (base, adapted):
        assert completion.text == " ".join(f"t{i}" for i in completion.token_ids)
    assert base.token_ids != adapted.token_ids  # the adapter's random factors change the greedy tokens
