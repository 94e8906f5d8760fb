"""Train the embedded demo that `python -m bdlora_jax.serve` starts on when no --model is given.

    python scripts/make_demo.py [--out bdlora_jax/demo] [--base-steps 1500] [--adapter-steps 1200]

1. Pretrains a small byte-level Llama (all parameters) to copy a word after "=", which gives it the prompt
   format and attention that looks back at the input.
2. Trains four task adapters on that frozen base with bdlora_jax.train, all adapters of a kind in one
   batch: "upper" and "caesar" as dense LoRA (rank 2, so `bdlora` on 8 devices serves them within
   max_lora_rank 16) and "reverse" and "double" as BD-LoRA with 8 blocks (rank 16).
3. Writes the model (HF format + tokenizer.json) and the adapters (PEFT format) under --out and prints each
   adapter's exact-match accuracy on held-out words.
Runs on a 2-core CPU in well under 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdlora_jax.checkpoint import save_hf_checkpoint
from bdlora_jax.config import ModelConfig, RopeScaling
from bdlora_jax.demo.tasks import examples, write_datasets
from bdlora_jax.mesh import make_mesh
from bdlora_jax.model.llama import forward, init_model
from bdlora_jax.sharding import make_plan
from bdlora_jax.tokenizer import BOS, EOS, PAD, byte_level_tokenizer, demo_tokenizer_config
from bdlora_jax.train.config import TrainConfig
from bdlora_jax.train.data import Example, pad_batch
from bdlora_jax.train.trainer import Trainer

DEMO_MODEL = ModelConfig(
    vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=8, num_kv_heads=8,
    head_dim=16, rope_theta=10000.0, max_position_embeddings=2048, bos_token_id=BOS, eos_token_ids=(EOS,),
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256),
    name="demo",
)
SEQ_LEN = 32
ADAPTER_RUNS = {  # one training run per adapter kind; every adapter of a run trains in the same batches
    "lora": dict(kind="lora", rank=2, alpha=4.0, tasks=("upper", "caesar")),
    "bdlora": dict(kind="bdlora", nblocks=8, rank=16, alpha=32.0, tasks=("reverse", "double")),
}


def _encode(tokenizer, record: dict) -> Example:
    prompt = [BOS] + tokenizer.encode(record["prompt"]).ids
    completion = tokenizer.encode(record["completion"]).ids + [EOS]
    return Example(np.asarray(prompt + completion, np.int32),
                   np.asarray([0.0] * len(prompt) + [1.0] * len(completion), np.float32))


def pretrain_base(steps: int, batch: int, seed: int = 0):
    """Full-parameter training of the base on the copy task; returns its parameter state."""
    plan = make_plan(make_mesh("1x1"), "replicated", DEMO_MODEL)
    graphdef, state = init_model(DEMO_MODEL, plan, jnp.float32, seed=seed)
    tokenizer = byte_level_tokenizer()
    data = [_encode(tokenizer, r) for r in examples("copy", steps * batch, seed)]
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, steps), weight_decay=0.01))
    opt_state = optimizer.init(state)

    @jax.jit
    def step(state, opt_state, inputs, targets, weights):
        def loss_fn(state):
            logits, _ = forward(graphdef, state, inputs, jnp.zeros(inputs.shape[0], jnp.int32))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights
            return loss.sum() / weights.sum()

        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    started = time.perf_counter()
    for i in range(steps):
        inputs, targets, weights = pad_batch(data[i * batch:(i + 1) * batch], SEQ_LEN, PAD)
        state, opt_state, loss = step(state, opt_state, inputs, targets, weights)
        if (i + 1) % 100 == 0:
            print(f"base step {i + 1}/{steps}: copy loss {float(loss):.4f} ({time.perf_counter() - started:.0f} s)")
    return state


def train_adapters(model_dir: Path, data_dir: Path, out: Path, steps: int) -> None:
    """Train each adapter run through bdlora_jax.train and export its adapters as PEFT directories."""
    for kind, run in ADAPTER_RUNS.items():
        adapters = {t: str(p) for t, p in write_datasets(data_dir, 4000, seed=0, tasks=run["tasks"]).items()}
        options = {k: v for k, v in run.items() if k != "tasks"}
        cfg = TrainConfig(model=str(model_dir), adapters=adapters, batch_size=32, seq_len=SEQ_LEN, steps=steps,
                          learning_rate=5e-3, warmup_steps=50, eval_every=steps, save_every=steps, keep_last=1,
                          out_dir=str(data_dir / f"run-{kind}"), eval_fraction=0.05, **options)
        trainer = Trainer(cfg)
        records = trainer.fit(progress=False)
        print(f"{kind} adapters {list(adapters)}: final train loss {records[-1]['adapter_loss']}, "
              f"eval {records[-1].get('eval_loss')}")
        trainer.export(out / "adapters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "bdlora_jax" / "demo")
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--adapter-steps", type=int, default=1200)
    args = parser.parse_args()
    for stale in (args.out / "model", args.out / "adapters"):
        if stale.exists():
            shutil.rmtree(stale)
    state = pretrain_base(args.base_steps, batch=64)
    save_hf_checkpoint(DEMO_MODEL, state, args.out / "model")
    byte_level_tokenizer().save(str(args.out / "model" / "tokenizer.json"))
    (args.out / "model" / "tokenizer_config.json").write_text(json.dumps(demo_tokenizer_config(), indent=2) + "\n")
    with tempfile.TemporaryDirectory() as work:
        train_adapters(args.out / "model", Path(work), args.out, args.adapter_steps)
    from bdlora_jax.bench.demo_accuracy import demo_accuracy

    print(json.dumps(demo_accuracy(model=str(args.out / "model"), adapters_dir=args.out / "adapters", mesh="1x1",
                                   strategy="replicated", n=100)))


if __name__ == "__main__":
    main()
