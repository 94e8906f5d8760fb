"""Make the embedded demo that `python -m bdlora_jax.serve` starts on when no --model is given.

    python scripts/make_demo.py [--out bdlora_jax/demo]

Writes a small Llama (byte-level tokenizer, random weights) as a Hugging Face directory and a few PEFT
adapters next to it: dense LoRA and BD-LoRA with 8 blocks, so the demo serves under every strategy on
meshes up to 1x8. The weights are random until the training issue replaces them with trained ones.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import jax.numpy as jnp

from bdlora_jax.checkpoint import save_hf_checkpoint
from bdlora_jax.config import LORA_MODULES, ModelConfig, RopeScaling
from bdlora_jax.lora.peft_io import write_adapter
from bdlora_jax.lora.synthetic import random_adapter
from bdlora_jax.mesh import make_mesh
from bdlora_jax.model.llama import init_model
from bdlora_jax.sharding import make_plan
from bdlora_jax.tokenizer import BOS, EOS, byte_level_tokenizer

DEMO_MODEL = ModelConfig(
    vocab_size=264, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8, num_kv_heads=8,
    head_dim=16, rope_theta=500000.0, max_position_embeddings=2048, bos_token_id=BOS, eos_token_ids=(EOS,),
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256),
    name="demo",
)
# name: (rank, nblocks, seed); dense ranks stay <= 2 so that bdlora on 8 devices serves them within rank 16
DEMO_ADAPTERS = {"demo-lora-a": (2, 1, 1), "demo-lora-b": (2, 1, 2), "demo-bd-a": (16, 8, 3), "demo-bd-b": (16, 8, 4)}


def make_demo(out: Path) -> None:
    """Write the demo model, tokenizer and adapters under `out`."""
    if out.exists():
        shutil.rmtree(out)
    plan = make_plan(make_mesh("1x1"), "replicated", DEMO_MODEL)
    _, state = init_model(DEMO_MODEL, plan, jnp.float32, seed=0)
    save_hf_checkpoint(DEMO_MODEL, state, out / "model")
    byte_level_tokenizer().save(str(out / "model" / "tokenizer.json"))
    for name, (rank, nblocks, seed) in DEMO_ADAPTERS.items():
        adapter = random_adapter(DEMO_MODEL, name, rank=rank, nblocks=nblocks, seed=seed, modules=LORA_MODULES)
        write_adapter(adapter, out / "adapters" / name)
    print(f"wrote {out}: model + {len(DEMO_ADAPTERS)} adapters")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "bdlora_jax" / "demo")
    make_demo(parser.parse_args().out)
