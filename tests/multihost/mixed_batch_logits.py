"""Run under bdlora_jax.launch (or alone): the fixture model's logits of a mixed batch (no adapter, dense LoRA,
BD-LoRA) on each mesh and strategy asked for, saved by process 0 as OUT/<mesh>-<strategy>.npy."""

import argparse
import sys
from pathlib import Path

from bdlora_jax.distributed import add_cluster_flags, is_leader, start_from_args

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf_tiny"
SEQUENCES = [[5, 17, 3, 99, 42, 7], [1, 2, 3], [250, 0, 8, 8, 31], [64, 65], [9, 10, 11, 12, 13, 14, 15]]
ADAPTERS = [None, "lora", "bd", "bd", "lora"]  # bd: 8 blocks, whole blocks per device on 1x8 and 2x4


def mixed_batch_logits(mesh: str, strategy: str):
    """Per sequence, its logits (length, vocab) under its adapter, on mesh and strategy."""
    from bdlora_jax import Engine
    from bdlora_jax.adapters.synthetic import random_adapter

    engine = Engine.from_pretrained(FIXTURES / "model", mesh=mesh, strategy=strategy, max_loras=3, max_lora_rank=32)
    engine.add_adapter("lora", FIXTURES / "adapters" / "lora_rs_r4_qv")
    engine.add_adapter("bd", random_adapter(engine.model_config, "bd", rank=8, nblocks=8, seed=4))
    return engine.batch_logits(SEQUENCES, ADAPTERS)


def main() -> int:
    """Compute and save each mesh x strategy's logits."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--meshes", default="1x8,2x4")
    p.add_argument("--strategies", default="replicated,slora,bdlora")
    add_cluster_flags(p)
    args = p.parse_args()
    start_from_args(args)
    import numpy as np

    for mesh in args.meshes.split(","):
        for strategy in args.strategies.split(","):
            logits = mixed_batch_logits(mesh, strategy)
            if is_leader():
                np.save(args.out / f"{mesh}-{strategy}.npy", np.concatenate(logits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
