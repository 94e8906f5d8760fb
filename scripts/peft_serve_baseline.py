"""Hugging Face transformers + PEFT generation throughput on the benchmark model: the reference that
`python -m bdlora_jax.bench serve` is compared against.

    pip install torch transformers peft     # for this script only: never a dependency of bdlora_jax
    python scripts/peft_serve_baseline.py [--out /tmp/peft_bench] [--model small-32k] [--batch 32]
        [--prompt-len 32] [--new-tokens 64] [--adapters 32] [--rank 16] [--repeats 3] [--seed 0] [--threads N]
        [--json]

Run it from the repository root with the package importable (pip install -e . or PYTHONPATH=$PWD): the model
shape comes from the package's model config (configs/models/small-32k.yaml by default) and the adapters from
bdlora_jax.adapters.synthetic.random_adapter. It writes, under --out:

    model/          a random LlamaForCausalLM of that shape (float32, torch seed --seed): config.json and
                    model.safetensors, which `python -m bdlora_jax.bench serve --model OUT/model` serves
    adapters/a{i}/  --adapters PEFT LoRA adapters of rank --rank on all seven projections of every layer
                    (A and B random and nonzero, alpha = 2 * rank), saved by PEFT's save_pretrained; with
                    --seed 0 adapter a{i} holds the factors that bench serve draws for its adapter a{i} on a
                    one-device mesh (plain LoRA)

It then reloads both from disk and measures, in one process, with --threads torch threads (default: every
core), greedy generation of exactly --new-tokens tokens per row (min_new_tokens = max_new_tokens) from --batch
random prompts of --prompt-len token ids:

    base only       model.generate on the plain base model (no PEFT layers at all)
    1 adapter       a PeftModel holding every adapter, with a0 active for the whole batch
    N adapters      the same PeftModel, one mixed batch: generate(..., adapter_names=[...]) gives row i
                    adapter a{i % N} (PEFT's mixed-adapter batch inference)

Each configuration runs once as a warm-up, then --repeats times, interleaved so that load drift hits all
alike; the median is reported as tokens/s = batch * new_tokens / seconds, with its ratio to base only
(the table and JSON layout of bench serve). The 1-minute load average before timing is reported too: on a
shared host other work skews the numbers, and torch's threads, waiting on each other at every operation, suffer
most where the adapters add many small operations; --threads 1 is then the steadier measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.checkpoint import hf_config_dict, load_model_config, resolve_model_config
from bdlora_jax.config import ATTENTION_MODULES, LORA_MODULES, ModelConfig

BASE = "base only"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; sizes must be positive and there must be at least one adapter."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/peft_bench"),
                        help="directory for model/ and adapters/ (created; files in it are overwritten)")
    parser.add_argument("--model", default="small-32k",
                        help="model config giving the shape: a configs/models name or a *.yaml file")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters written and mixed in a batch")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base weights, adapters and prompts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: every core; on a busy host fewer can be much faster)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for option in ("batch", "prompt_len", "new_tokens", "adapters", "rank", "repeats", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')}={getattr(args, option)}: expected a positive integer")
    return args


def hf_llama_config(config: ModelConfig) -> LlamaConfig:
    """The transformers LlamaConfig of this shape (no end-of-sequence token: generation runs to its length)."""
    return LlamaConfig.from_dict({**hf_config_dict(config), "eos_token_id": None, "dtype": "float32"})


def write_model(config: ModelConfig, path: Path, seed: int) -> None:
    """Save a float32 LlamaForCausalLM with random weights (transformers' init, torch seed `seed`) to `path`,
    and check that bdlora_jax reads back the same shape from it."""
    torch.manual_seed(seed)
    LlamaForCausalLM(hf_llama_config(config)).to(torch.float32).save_pretrained(path, safe_serialization=True)
    loaded = dataclasses.replace(load_model_config(path), name=config.name)
    if loaded != config:
        raise SystemExit(f"{path / 'config.json'}: bdlora_jax reads it as {loaded}; expected {config}")


def lora_layer(model: PeftModel, layer: int, module: str):
    """The PEFT LoRA layer wrapping projection `module` of decoder layer `layer`."""
    block = model.base_model.model.model.layers[layer]
    return getattr(block.self_attn if module in ATTENTION_MODULES else block.mlp, module)


def write_adapters(config: ModelConfig, model_dir: Path, path: Path, count: int, rank: int, seed: int) -> None:
    """Save `count` LoRA adapters a0.. (random_adapter's factors, seed `seed + i`) to path/a{i} with PEFT."""
    model = None
    for i in range(count):
        adapter = random_adapter(config, f"a{i}", rank=rank, seed=seed + i)
        lora = LoraConfig(r=rank, lora_alpha=adapter.alpha, target_modules=list(LORA_MODULES), lora_dropout=0.0)
        if model is None:
            model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora,
                                   adapter_name=adapter.name)
        else:
            model.add_adapter(adapter.name, lora)
        with torch.no_grad():
            for (layer, module), factors in adapter.modules.items():
                target = lora_layer(model, layer, module)
                target.lora_A[adapter.name].weight.copy_(torch.from_numpy(factors.a))
                target.lora_B[adapter.name].weight.copy_(torch.from_numpy(factors.b))
    model.save_pretrained(path, safe_serialization=True)


def load_models(model_dir: Path, adapters_dir: Path, count: int) -> tuple[LlamaForCausalLM, PeftModel]:
    """The plain base model, and a second copy of it wrapped in a PeftModel holding adapters a0..a{count-1}."""
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with_adapters = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                              adapters_dir / "a0", adapter_name="a0")
    for i in range(1, count):
        with_adapters.load_adapter(adapters_dir / f"a{i}", adapter_name=f"a{i}")
    with_adapters.set_adapter("a0")
    return base, with_adapters.eval()


def check_adapters_apply(peft_model: PeftModel, base: LlamaForCausalLM, input_ids: torch.Tensor,
                         names: list[str]) -> None:
    """Fail unless the mixed batch's logits differ from the base model's in every row (the adapters act)."""
    with torch.inference_mode():
        mixed = peft_model(input_ids=input_ids, adapter_names=names).logits
        plain = base(input_ids=input_ids).logits
    unchanged = [i for i in range(len(names)) if torch.equal(mixed[i], plain[i])]
    if unchanged:
        raise SystemExit(f"rows {unchanged}: the mixed-adapter batch gave the base model's logits; "
                         "the adapters were not applied")


def generator(model, input_ids: torch.Tensor, new_tokens: int, adapter_names: list[str] | None):
    """A function that runs one greedy generate of exactly `new_tokens` tokens per row and returns its seconds."""
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    mask = torch.ones_like(input_ids)

    def timed() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, **kwargs)
        seconds = time.perf_counter() - start
        if tuple(out.shape) != (input_ids.shape[0], input_ids.shape[1] + new_tokens):
            raise SystemExit(f"generate returned shape {tuple(out.shape)}; expected "
                             f"({input_ids.shape[0]}, {input_ids.shape[1] + new_tokens})")
        return seconds

    return timed


def throughput(runs: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """Median tokens/s of each configuration's run and its ratio to base only; one warm-up each, then timed
    interleaved."""
    for run in runs.values():
        run()
    samples = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            samples[label].append(run())
    results = {}
    for label, times in samples.items():
        seconds = statistics.median(times)
        results[label] = {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds}
    for entry in results.values():
        entry["ratio_to_base"] = entry["tokens_per_s"] / results[BASE]["tokens_per_s"]
    return results


def measure(args: argparse.Namespace) -> dict:
    """Write the model and adapters under --out, reload them, and measure every configuration."""
    try:
        config = resolve_model_config(args.model)
    except ValueError as e:
        raise SystemExit(f"--model {args.model!r}: {e}") from None
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir, adapters_dir = args.out / "model", args.out / "adapters"
    write_model(config, model_dir, args.seed)
    write_adapters(config, model_dir, adapters_dir, args.adapters, args.rank, args.seed)
    base, peft_model = load_models(model_dir, adapters_dir, args.adapters)

    rng = np.random.default_rng(args.seed)
    input_ids = torch.from_numpy(rng.integers(0, config.vocab_size, (args.batch, args.prompt_len)))
    mixed = [f"a{i % args.adapters}" for i in range(args.batch)]
    check_adapters_apply(peft_model, base, input_ids, mixed)
    runs = {
        BASE: generator(base, input_ids, args.new_tokens, None),
        "1 adapter": generator(peft_model, input_ids, args.new_tokens, None),
        f"{args.adapters} adapters": generator(peft_model, input_ids, args.new_tokens, mixed),
    }
    load = os.getloadavg()[0]
    results = throughput(runs, args.batch, args.new_tokens, args.repeats)
    return {
        "setup": {"model": config.name, "model_dir": str(model_dir), "adapters_dir": str(adapters_dir),
                  "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                  "rank": args.rank, "adapters": args.adapters, "repeats": args.repeats, "dtype": "float32",
                  "platform": "cpu", "threads": args.threads, "load_average_before": round(load, 2),
                  "torch": torch.__version__,
                  "transformers": transformers.__version__, "peft": peft.__version__},
        "results": results,
    }


def print_report(report: dict) -> None:
    """One line per configuration: seconds, tokens/s and the ratio to base only."""
    s = report["setup"]
    print(f"HF transformers {s['transformers']} + PEFT {s['peft']} generate, torch {s['torch']} on {s['platform']} "
          f"({s['threads']} torch threads, load average {s['load_average_before']} before timing)")
    print(f"{s['model']} {s['dtype']}, batch {s['batch']}, prompt {s['prompt_len']}, new tokens {s['new_tokens']}, "
          f"rank {s['rank']}, median of {s['repeats']}")
    print(f"{'configuration':<16}{'seconds':>10}{'tokens/s':>12}{'ratio to base':>16}")
    for label, entry in report["results"].items():
        print(f"{label:<16}{entry['seconds']:>10.3f}{entry['tokens_per_s']:>12.1f}{entry['ratio_to_base']:>16.3f}")


def main(argv: list[str] | None = None) -> int:
    """Measure and print the report as a table, or as one JSON object with --json."""
    args = parse_args(argv)
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
