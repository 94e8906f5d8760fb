"""`bench step`: one decode step against the floor of its weight matmuls, and the sampler alone, side by side.

Every arm runs in one process on one engine, warmed up first and then timed interleaved (round after round), so
load drift hits all alike: the engine's decode step (greedy sampling included) with base-only rows, one adapter
and N distinct adapters; the model's weight matmuls alone at the same shapes, dtype and mesh (each device's own
slices, no collectives: the floor); and the sampler alone on (batch, vocab) logits, greedy and a mix of top-p 0.9 /
top-k 50 rows. The mixed rows draw from peaked logits, as a trained model's are (each nucleus holds tens of
tokens); a random-weight model's logits are near uniform, and the same mix on those is reported beside it: its
top-p rows need the exact sorted path. A batch where a quarter of the rows sample shows what greedy rows beside
sampling ones cost. Each arm is printed in milliseconds and as a ratio to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np

from .common import SMALL_32K, model_config, shared_options

NAME = "step"
HELP = "decode step and sampler against the weight-matmul floor"
OPTIONS = shared_options(model=SMALL_32K, mesh="1x1", strategy=True, dtype="float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Decode rows, adapter rank and counts, KV-cache length, timed rounds and the LoRA implementation."""
    parser.add_argument("--batch", type=int, default=32, help="decode rows")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", default="1,8,32", help="comma-separated numbers of distinct adapters")
    parser.add_argument("--context", type=int, default=128, help="KV-cache length of every row (max_seq_len)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (the median of each arm is reported)")
    parser.add_argument("--lora-impl", default="auto", choices=("auto", "xla", "pallas"))


def _engine(args: argparse.Namespace, max_loras: int):
    """An engine of the bench's model with max_loras random rank-`rank` BD-LoRA adapters (one block per device)."""
    import jax.numpy as jnp

    from ..adapters.linear import resolve_lora_impl
    from ..adapters.synthetic import random_adapter
    from ..checkpoint import load_hf_params
    from ..config import EngineConfig
    from ..demo import resolve_model_path
    from ..engine.engine import Engine
    from ..mesh import make_mesh
    from ..model.llama import init_model
    from ..sharding import make_plan

    config = model_config(args.model)
    plan = make_plan(make_mesh(args.mesh), args.strategy, config, args.rank)
    model_lora_impl = resolve_lora_impl(args.lora_impl, plan.mesh.devices.flat[0].platform)
    engine_config = EngineConfig(mesh=args.mesh, strategy=args.strategy, max_loras=max_loras,
                                 max_lora_rank=args.rank, max_batch=args.batch, max_seq_len=args.context,
                                 dtype=args.dtype, lora_impl=args.lora_impl)
    path = resolve_model_path(args.model)
    if path.is_dir():
        params = load_hf_params(path, config, plan, jnp.dtype(args.dtype), lora_impl=model_lora_impl)
    else:
        params = init_model(config, plan, jnp.dtype(args.dtype), lora_impl=model_lora_impl)
    engine = Engine(config, params, engine_config, None, plan)
    for i in range(max_loras):
        engine.add_adapter(f"a{i}", random_adapter(config, f"a{i}", rank=args.rank, nblocks=plan.model_size, seed=i))
    return engine


def weight_matmuls(engine, batch: int):
    """A jitted call of every weight matmul of one decode step (7 per layer and the LM head) on `batch` rows, each
    device multiplying its own slices of x and w, and its inputs: the floor a decode step can't go below."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from ..config import LORA_MODULES
    from ..mesh import MODEL
    from ..sharding import weight_axes

    plan, config = engine.plan, engine.model_config
    model = nnx.merge(engine.graphdef, engine.state)
    dtype = model.embed[...].dtype
    weights, w_specs = [], []
    for layer in model.layers:
        for module in LORA_MODULES:
            group = layer.attn if hasattr(layer.attn, module) else layer.mlp
            weights.append(getattr(group, module)[...])
            w_specs.append(plan.spec(weight_axes(module)))
    weights.append(model.embed[...].T if config.tie_word_embeddings else model.lm_head[...])
    w_specs.append(plan.spec(("embed", "vocab")))
    x_specs = [PartitionSpec(None, spec[0] if len(spec) else None) for spec in w_specs]
    rng = np.random.default_rng(0)
    inputs = [jax.device_put(jnp.asarray(rng.normal(size=(batch, w.shape[0])), dtype), NamedSharding(plan.mesh, spec))
              for w, spec in zip(weights, x_specs)]

    def local(xs, ws):
        return [jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)[None] for x, w in zip(xs, ws)]

    floor = jax.jit(jax.shard_map(local, mesh=plan.mesh, in_specs=(x_specs, w_specs),
                                  out_specs=[PartitionSpec(MODEL)] * len(weights), check_vma=False))
    return lambda: floor(inputs, weights)


def _sampler_arms(engine, batch: int) -> dict:
    """The sampler alone: greedy rows, the top-p 0.9 / top-k 50 mix on peaked and on the model's flat logits, and a
    batch where every fourth row samples with top-p 0.9 and the rest are greedy."""
    import jax
    import jax.numpy as jnp

    from ..engine.sampler import row_keys, sample

    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(1)
    peaked = jnp.asarray(rng.normal(scale=6.0, size=(batch, vocab)), jnp.float32)
    flat = jnp.asarray(rng.normal(scale=1.0, size=(batch, vocab)), jnp.float32)
    keys = row_keys(jnp.arange(batch, dtype=jnp.int32), jnp.zeros((batch,), jnp.int32))
    mixed = (jnp.ones((batch,), jnp.float32), jnp.where(jnp.arange(batch) % 2 == 0, 0.9, 1.0).astype(jnp.float32),
             jnp.where(jnp.arange(batch) % 2 == 1, 50, 0).astype(jnp.int32))
    greedy = (jnp.zeros((batch,), jnp.float32), jnp.ones((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32))
    quarter = (jnp.where(jnp.arange(batch) % 4 == 0, 1.0, 0.0).astype(jnp.float32),
               jnp.full((batch,), 0.9, jnp.float32), jnp.zeros((batch,), jnp.int32))
    jax.block_until_ready(keys)
    return {
        "sampler greedy": lambda: sample(peaked, *greedy, keys),
        "sampler top-p/top-k mix": lambda: sample(peaked, *mixed, keys),
        "sampler mix, flat logits": lambda: sample(flat, *mixed, keys),
        "sampler, 1/4 rows top-p": lambda: sample(peaked, *quarter, keys),
    }


def nucleus_size(logits: np.ndarray, top_p: float) -> float:
    """Mean number of tokens in each row's top-p nucleus."""
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    ordered = -np.sort(-probs, axis=-1)
    before = np.cumsum(ordered, axis=-1) - ordered
    return float((before < top_p).sum(axis=-1).mean())


def run(args: argparse.Namespace) -> dict:
    """Time every arm interleaved and report medians with ratios to the floor and to the base-only step."""
    import jax

    from ..engine.generator import StepPlan

    counts = [int(n) for n in args.adapters.split(",") if n]
    engine = _engine(args, max(counts + [1]))
    generator = engine.generator
    rows = generator.rows
    configurations = {"base only": [None] * rows, "1 adapter": ["a0"] * rows}
    configurations.update({f"{n} adapters": [f"a{i % n}" for i in range(rows)] for n in counts if n > 1})
    generator.warm_up()
    arms = {"weight matmuls (floor)": weight_matmuls(engine, rows)}
    for label, names in configurations.items():
        slots, clusters, sigma_ids = engine.resolve(names)
        plan = StepPlan((), tuple(slots), tuple(range(rows)), tuple(clusters), tuple(sigma_ids))
        arms[f"decode step, {label}"] = partial(generator.decode, plan)
    arms.update(_sampler_arms(engine, rows))
    for call in arms.values():  # warm-up: compiles whatever warm_up did not
        jax.block_until_ready(call())
    samples: dict[str, list[float]] = {label: [] for label in arms}
    for _ in range(args.repeats):
        for label, call in arms.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            samples[label].append(time.perf_counter() - start)
    ms = {label: 1000 * statistics.median(times) for label, times in samples.items()}
    floor, base = ms["weight matmuls (floor)"], ms["decode step, base only"]
    results = {label: {"ms": value, "ratio_to_floor": value / floor, "ratio_to_base_step": value / base}
               for label, value in ms.items()}
    rng = np.random.default_rng(1)
    vocab = engine.model_config.vocab_size
    return {
        "setup": {"model": engine.model_config.name, "mesh": args.mesh, "strategy": args.strategy, "batch": rows,
                  "rank": args.rank, "context": args.context, "dtype": args.dtype, "repeats": args.repeats,
                  "lora_impl": args.lora_impl, "platform": engine.plan.mesh.devices.flat[0].platform,
                  "nucleus_tokens_peaked": nucleus_size(rng.normal(scale=6.0, size=(rows, vocab)), 0.9),
                  "nucleus_tokens_flat": nucleus_size(rng.normal(scale=1.0, size=(rows, vocab)), 0.9)},
        "results": results,
    }


def print_report(report: dict) -> None:
    s = report["setup"]
    print(f"decode step, {s['model']} on mesh {s['mesh']} ({s['platform']}), strategy {s['strategy']}, batch "
          f"{s['batch']}, rank {s['rank']}, context {s['context']}, {s['dtype']}, median of {s['repeats']} rounds")
    print(f"{'arm':<34}{'ms':>10}{'/ floor':>10}{'/ base step':>13}")
    for label, entry in report["results"].items():
        print(f"{label:<34}{entry['ms']:>10.2f}{entry['ratio_to_floor']:>10.3f}{entry['ratio_to_base_step']:>13.3f}")
    print(f"top-p 0.9 nucleus: {s['nucleus_tokens_peaked']:.1f} tokens on the peaked logits, "
          f"{s['nucleus_tokens_flat']:.0f} on the flat ones")
