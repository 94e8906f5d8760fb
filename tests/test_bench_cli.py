"""The bench command line: every registered subcommand module has the subcommand interface, and each
subcommand's flags and defaults are the documented ones."""

import pytest

from bdlora_jax.bench.cli import SUBCOMMANDS, build_parser
from bdlora_jax.config import STRATEGIES

LLAMA_8B = "configs/models/llama-3.1-8b.yaml"
SMALL_32K = "configs/models/small-32k.yaml"
CLUSTER_FLAGS = {"coordinator_address": None, "num_processes": None, "process_id": None,
                 "cpu_devices_per_process": None}
DEFAULTS = {
    "comm": {"model": LLAMA_8B, "mesh": "1x8", "strategy": "bdlora", "dtype": "bfloat16", "json": False, "rank": 16,
             "batch": 16, "seq_len": 2048, "max_loras": 8},
    "serve": {"model": SMALL_32K, "mesh": "1x1", "strategy": "bdlora", "dtype": "float32", "json": False, "batch": 32,
              "prompt_len": 32, "new_tokens": 64, "rank": 16, "adapters": "8,32", "repeats": 3,
              "kv_cache": "contiguous", "page_size": 16, "max_num_batched_tokens": 256},
    "load": {"json": False, "base_url": "http://127.0.0.1:8000/v1", "model": None, "num_prompts": 100,
             "request_rate": float("inf"), "burstiness": 1.0, "max_concurrency": None, "seed": 0, "input_len": 32,
             "output_len": 32, "range_ratio": 0.0, "output_range_ratio": None, "vocab_size": 256, "dataset": None, "ignore_eos": True,
             "lora_modules": None, "lora_assignment": "random", "zipf_alpha": 1.0, "timeout": 300.0,
             "max_duration": None, "goodput": None, "sweep_rates": None, "plot": None, "save_json": None},
    "step": {"model": SMALL_32K, "mesh": "1x1", "strategy": "bdlora", "dtype": "float32", "json": False, "batch": 32,
             "rank": 16, "adapters": "1,8,32", "context": 128, "repeats": 30, "lora_impl": "auto"},
    "demo-accuracy": {"model": "demo", "mesh": "1x1", "strategy": "bdlora", "json": False, "adapters_dir": None,
                      "n": 100, "max_batch": 32, "max_lora_rank": 16, "compressed_bank": None},
    "kernel": {"model": LLAMA_8B, "strategy": "bdlora", "dtype": "bfloat16", "json": False, "model_size": 8,
               "ranks": [8, 16, 32, 64, 128], "adapters": [1, 4, 16, 64, 256], "decode_tokens": 256,
               "prefill_tokens": 2048, "iters": 20},
    "lower": {"model": LLAMA_8B, "mesh": "1x8", "strategy": "bdlora", "dtype": "bfloat16", "json": False, "rank": 16,
              "batch": 16, "seq_len": 2048, "max_loras": 8, "platform": "cuda"},
    "compress": {"model": "demo", "mesh": "1x1", "strategy": "bdlora", "json": False, "adapters": 1000,
                 "adapter_rank": 16, "families": 8, "noise": 0.1, "ranks": "8,16,32", "clusters": "1,8",
                 "method": "full", "serve_rank": 16, "serve_clusters": 8, "max_loras": 8, "max_batch": 32,
                 "requests": 128, "prompt_len": 16, "new_tokens": 16, "repeats": 2, "skip_serving": False},
    "train": {"model": SMALL_32K, "mesh": "1x1", "strategy": "bdlora", "dtype": "float32", "json": False,
              "adapters": 4, "batch": 32, "seq_len": 128, "lengths": "fixed", "packing": False, "loss_chunk": 0,
              "rank": 16, "examples": 512, "warmup": 2, "steps": 5, "seed": 0},
    "cost": {"model": LLAMA_8B, "mesh": "1x8", "dtype": "bfloat16", "json": False, "device": None, "ranks": [16, 64],
             "multipliers": [2, 4], "batch": 16, "seq_len": 2048, "max_loras": 8, "adapters": 1},
}


def test_every_subcommand_module_has_the_interface():
    names = [module.NAME for module in SUBCOMMANDS]
    assert names == ["comm", "serve", "load", "step", "demo-accuracy", "kernel", "lower", "ablate", "compress", "cost",
                     "train"]
    for module in SUBCOMMANDS:
        assert isinstance(module.HELP, str) and module.__doc__
        assert all(callable(getattr(module, f)) for f in ("add_arguments", "run", "print_report"))


@pytest.mark.parametrize("command", list(DEFAULTS))
def test_flags_and_defaults_of_each_subcommand(command):
    args = vars(build_parser().parse_args([command]))
    cluster = CLUSTER_FLAGS if "mesh" in DEFAULTS[command] else {}  # the multi-process flags go with --mesh
    assert args == {"command": command, **DEFAULTS[command], **cluster}


def test_ablate_takes_a_config_and_an_output_root():
    args = build_parser().parse_args(["ablate", "--config", "smoke"])
    assert (args.config.name, str(args.out), args.json, args.mesh) == ("smoke", "results", False, "1x2")


@pytest.mark.parametrize("command", ["comm", "serve", "step", "demo-accuracy", "kernel", "lower", "compress",
                                     "train"])
def test_strategy_choices_are_the_strategies(command, capsys):
    for strategy in STRATEGIES:
        assert build_parser().parse_args([command, "--strategy", strategy]).strategy == strategy
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--strategy", "lora"])
    assert "invalid choice: 'lora'" in capsys.readouterr().err
