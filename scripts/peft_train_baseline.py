"""Hugging Face transformers + PEFT training throughput on the benchmark model: the reference that
`python -m bdlora_jax.bench train` is compared against.

    pip install torch transformers peft     # for this script only: never a dependency of bdlora_jax
    python scripts/peft_train_baseline.py [--out /tmp/peft_train] [--model small-32k] [--adapters 4] [--batch 32]
        [--seq-len 128] [--lengths fixed|uniform:LOW-HIGH] [--rank 16] [--examples 512] [--warmup 2] [--steps 5]
        [--seed 0] [--threads N] [--json]

Run it from the repository root with the package importable (PYTHONPATH=$PWD). The model shape comes from the
package's model config; a random LlamaForCausalLM of it (float32, torch seed --seed) is saved under --out/model
in Hugging Face format and loaded back. The data are the very datasets bench train writes for the same
arguments (bdlora_jax.bench.train.write_datasets: random token ids, --examples per adapter).

The --adapters LoRA adapters (rank --rank, alpha 2·rank, all seven projections, dropout 0) live in one
PeftModel and train one after another, as PEFT trains several adapters: a step of ours (--batch rows, --batch/K
per adapter) is here K steps, one per adapter (set_adapter, forward, backward, clipping to norm 1, AdamW),
each on that adapter's --batch/K next examples right-padded to the longest of them (the usual collator). After
--warmup steps, --steps steps are timed; real tokens/s counts the tokens predicted (n - 1 of an n-token
example), padding not counted, as bench train does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bdlora_jax.bench.train import write_datasets
from bdlora_jax.checkpoint import hf_config_dict, resolve_model_config
from bdlora_jax.config import LORA_MODULES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; sizes must be positive and --batch a multiple of --adapters."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/peft_train"), help="directory for model/ and data/")
    parser.add_argument("--model", default="small-32k", help="model config: a configs/models name or a *.yaml file")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="rows of one of our steps, --batch/--adapters each")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lengths", default="fixed", help="fixed (seq_len + 1 tokens) or uniform:LOW-HIGH")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--examples", type=int, default=512, help="examples in each adapter's dataset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for option in ("adapters", "batch", "seq_len", "rank", "examples", "steps", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')}={getattr(args, option)}: expected a positive integer")
    if args.batch % args.adapters:
        parser.error(f"--batch={args.batch} must be a multiple of --adapters={args.adapters}")
    return args


def build_model(args: argparse.Namespace, config) -> torch.nn.Module:
    """The random base saved in HF format and loaded back, wrapped in a PeftModel with adapters a0..a{K-1}."""
    torch.manual_seed(args.seed)
    hf_config = LlamaConfig.from_dict({**hf_config_dict(config), "dtype": "float32"})
    LlamaForCausalLM(hf_config).save_pretrained(args.out / "model", safe_serialization=True)
    base = LlamaForCausalLM.from_pretrained(args.out / "model", dtype=torch.float32)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(LORA_MODULES), lora_dropout=0.0)
    model = get_peft_model(base, lora, adapter_name="a0")
    for i in range(1, args.adapters):
        model.add_adapter(f"a{i}", lora)
    return model.train()


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids, attention_mask, and labels with -100 on padding."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def measure(args: argparse.Namespace) -> dict:
    """Train warm-up then timed steps, every adapter in turn, and report real tokens/s."""
    try:
        config = resolve_model_config(args.model)
    except ValueError as e:
        raise SystemExit(f"--model {args.model!r}: {e}") from None
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    paths = write_datasets(args.out / "data", args.adapters, args.examples, args.lengths, args.seq_len,
                           config.vocab_size, args.seed)
    data = {name: [json.loads(line)["input_ids"] for line in path.read_text().splitlines()]
            for name, path in paths.items()}
    model = build_model(args, config)
    # every adapter's factors (set_adapter makes only the active adapter's require gradients; the rest get none)
    lora_params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW([p for _, p in lora_params], lr=1e-3)
    per = args.batch // args.adapters
    seconds, tokens, loss = 0.0, 0, float("nan")
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        step_tokens = 0
        for name, examples in data.items():
            rows = [examples[(step * per + j) % len(examples)] for j in range(per)]
            model.set_adapter(name)
            if step == 0 and name == "a1" and not all(p.requires_grad == ("a1" in n) for n, p in lora_params):
                raise SystemExit("set_adapter left other adapters trainable; each adapter must train alone")
            out = model(**collate(rows))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_tokens += sum(len(r) - 1 for r in rows)
            loss = float(out.loss.detach())
        if step >= args.warmup:
            seconds += time.perf_counter() - started
            tokens += step_tokens
    return {"model": config.name, "adapters": args.adapters, "batch": args.batch, "seq_len": args.seq_len,
            "lengths": args.lengths, "rank": args.rank, "timed_steps": args.steps, "threads": args.threads,
            "seconds_per_step": seconds / args.steps, "real_tokens_per_s": tokens / seconds, "final_loss": loss,
            "load_average_1m": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    """Measure and print the report (one JSON object with --json)."""
    args = parse_args(argv)
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"PEFT train  model={report['model']} adapters={report['adapters']} batch={report['batch']} "
              f"seq_len={report['seq_len']} lengths={report['lengths']} threads={report['threads']}")
        print(f"  real tokens/s  {report['real_tokens_per_s']:10.1f}   ({report['seconds_per_step']:.3f} s a step "
              f"of {report['adapters']} adapter steps, load average {report['load_average_1m']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
