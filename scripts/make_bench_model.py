"""Write a random model and random adapters that `python -m bdlora_jax.serve` (or any server of HF + PEFT
directories) serves, for load benchmarks at real model shapes.

    python scripts/make_bench_model.py --out /tmp/bench-small-32k [--model small-32k] [--adapters 32] [--rank 16]
        [--nblocks 1] [--seed 0]

Writes, under --out:

    model/          a Llama of the model config's shape with random weights (seed --seed): config.json,
                    model.safetensors and a tokenizer.json whose token i is the word "t{i}", so every generated
                    token streams as text
    adapters/a{i}/  --adapters PEFT LoRA adapters of rank --rank on all seven projections of every layer
                    (bdlora_jax.adapters.synthetic.random_adapter, seed --seed + i); BD-LoRA adapters with
                    --nblocks blocks when it is above 1 (for --strategy bdlora on that many devices)

and prints the serve flags that register the adapters (--lora-modules a0=... a1=...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bdlora_jax.adapters.peft_io import write_adapter
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.checkpoint import resolve_model_config, save_hf_checkpoint
from bdlora_jax.mesh import make_mesh
from bdlora_jax.model.llama import init_model
from bdlora_jax.sharding import make_plan
from bdlora_jax.tokenizer import numbered_tokenizer


def write_bench_model(model: str, out: Path, adapters: int, rank: int, nblocks: int, seed: int) -> list[Path]:
    """The model directory and the adapter directories (see the module docstring); returns the adapters' paths."""
    config = resolve_model_config(model)
    plan = make_plan(make_mesh("1x1"), "replicated", config, rank)
    _, state = init_model(config, plan, seed=seed)
    model_dir = save_hf_checkpoint(config, state, out / "model")
    numbered_tokenizer(config.vocab_size).save(str(model_dir / "tokenizer.json"))
    return [write_adapter(random_adapter(config, f"a{i}", rank=rank, nblocks=nblocks, seed=seed + i), out / "adapters" / f"a{i}")
            for i in range(adapters)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write model/ and adapters/ under")
    parser.add_argument("--model", default="small-32k", help="model config: a configs/models name or a *.yaml file")
    parser.add_argument("--adapters", type=int, default=32, help="random adapters to write")
    parser.add_argument("--rank", type=int, default=16, help="rank of every adapter")
    parser.add_argument("--nblocks", type=int, default=1, help="BD-LoRA blocks of every adapter (1: plain LoRA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (adapter i: seed + i)")
    args = parser.parse_args()
    paths = write_bench_model(args.model, args.out, args.adapters, args.rank, args.nblocks, args.seed)
    print(f"--model {args.out / 'model'} --lora-modules " + " ".join(f"{p.name}={p}" for p in paths))


if __name__ == "__main__":
    main()
