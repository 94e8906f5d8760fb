"""Fine-tune several LoRA / BD-LoRA adapters at once on a frozen base, with the serving model, bank and strategies.

The loss is the sum over adapters of each adapter's mean token loss and gradients are clipped per adapter,
so every adapter gets exactly the update it would get training alone. The train state lives replicated on the
mesh from the start and the step is donated and compiled once. Rows are padded examples, or (packing) several
examples of one adapter each, attending only within themselves. Checkpoints (optax state included) go through
orbax's CheckpointManager every save_every steps and at the end; a resumed run continues as if uninterrupted.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ..adapters.bank import BankLayout, bank_specs
from ..adapters.peft_io import write_adapter
from ..demo import is_demo_model, resolve_model_path
from ..distributed import process_rows, to_host
from ..mesh import make_mesh
from ..model.llama import AdapterBatch, forward_hidden, init_model
from ..sharding import make_plan
from .config import TrainConfig
from .data import Example, PackedStream, draw, pack_batch, pad_batch, read_jsonl, split
from .factors import AdapterSpec, bank_rank, export, init_factors, to_bank
from .loss import token_cross_entropy


class TrainState(NamedTuple):
    """The trainable factors of every adapter and their optimizer state."""

    factors: dict
    opt_state: optax.OptState


class Batch(NamedTuple):
    """One batch on the mesh, (rows, seq_len) each but slots (rows,); packed rows add segment ids and positions."""

    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array
    slots: jax.Array
    segment_ids: jax.Array | None = None
    positions: jax.Array | None = None


def clip_by_adapter_norm(max_norm: float) -> optax.GradientTransformation:
    """Clip each adapter's gradient (the slice k of every leaf) to its own global norm, independently."""

    def update(updates, state, params=None):
        leaves = jax.tree.leaves(updates)
        squares = sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1) for x in leaves)
        factor = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(squares), 1e-12))
        return jax.tree.map(lambda x: x * factor.reshape((-1,) + (1,) * (x.ndim - 1)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Per-adapter clipping, then AdamW with linear warm-up and cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, min(cfg.warmup_steps, cfg.steps),
                                                  max(cfg.steps, cfg.warmup_steps + 1))
    return optax.chain(clip_by_adapter_norm(cfg.max_grad_norm), optax.adamw(schedule, weight_decay=cfg.weight_decay))


class Trainer:
    """Holds the frozen base on its mesh, the datasets and the trainable factors of every adapter."""

    def __init__(self, cfg: TrainConfig):
        from ..checkpoint import load_hf_params, load_model_config, load_tokenizer, resolve_model_config

        self.cfg = cfg
        path = resolve_model_path(cfg.model)
        if path.is_dir():
            self.model_config, self.tokenizer = load_model_config(path), load_tokenizer(path)
        else:  # a model config (configs/models/*.yaml or a shipped name): random weights, for benchmarks
            self.model_config, self.tokenizer = resolve_model_config(cfg.model), None
        self.spec = AdapterSpec(rank=cfg.rank, alpha=cfg.alpha, target_modules=tuple(cfg.target_modules),
                                nblocks=cfg.nblocks if cfg.kind == "bdlora" else 1, use_rslora=cfg.use_rslora)
        self.spec.validate(self.model_config)
        self.names = list(cfg.adapters)
        mesh = make_mesh(cfg.mesh)
        n = mesh.shape["model"]
        block_factors = cfg.strategy == "bdlora"
        rank = bank_rank(self.spec, n, block_factors)
        self.plan = make_plan(mesh, cfg.strategy, self.model_config, rank)
        self.layout = BankLayout(self.model_config, len(self.names) + 1, rank, n, block_factors, cfg.dtype)
        dtype = jnp.dtype(cfg.dtype)
        self.graphdef, self.state = (load_hf_params(path, self.model_config, self.plan, dtype) if path.is_dir()
                                     else init_model(self.model_config, self.plan, dtype, cfg.seed))
        self.train_sets, self.eval_sets, self.streams = {}, {}, {}
        eos = self.model_config.eos_token_ids[0] if self.model_config.eos_token_ids else None
        self.rows_per_adapter = per = cfg.batch_size // len(self.names)  # each adapter's rows lie together
        for i, (name, data) in enumerate(cfg.adapters.items()):
            examples = read_jsonl(data, self.tokenizer, self.model_config.bos_token_id, eos, cfg.seq_len + 1,
                                  self.model_config.vocab_size)
            self.train_sets[name], self.eval_sets[name] = split(examples, cfg.eval_fraction, cfg.seed + i)
            self.streams[name] = PackedStream(self.train_sets[name], per, cfg.seq_len, cfg.seed + 1000 * i)
        self.pad = eos if eos is not None else 0
        self.optimizer = make_optimizer(cfg)
        factors = init_factors(self.spec, self.model_config, len(self.names), cfg.seed)
        state = TrainState(factors, self.optimizer.init(factors))
        replicated = NamedSharding(self.plan.mesh, PartitionSpec())
        self.state_shardings = jax.tree.map(lambda _: replicated, state)
        self.train_state = jax.device_put(state, self.state_shardings)
        self._step = jax.jit(self._train_step, donate_argnums=(0,), out_shardings=(self.state_shardings, replicated))
        self._eval = jax.jit(lambda factors, batch, base: self._loss_sums(factors, batch, None, base,
                                                                          row_block=batch.inputs.shape[0]))

    def token_losses(self, factors, batch: Batch, dropout_key=None, base=None, row_block: int | None = None
                     ) -> jax.Array:
        """Each token's cross-entropy (rows, seq_len), weighted: 0 on padding and prompts. base: the frozen model's
        state (default self.state; jitted steps pass it as an argument rather than embed it as a constant).
        row_block: rows come in aligned blocks of this many rows of one adapter (AdapterBatch.row_block)."""
        specs = bank_specs(self.layout, self.plan)
        bank = to_bank(factors, self.spec, self.layout)
        bank = {k: tuple(jax.lax.with_sharding_constraint(x, NamedSharding(self.plan.mesh, s))
                         for x, s in zip(pair, specs[k])) for k, pair in bank.items()}
        start = jnp.zeros((batch.inputs.shape[0],), jnp.int32)
        rate = jnp.float32(self.cfg.dropout) if dropout_key is not None else None
        hidden, head = forward_hidden(self.graphdef, self.state if base is None else base, batch.inputs, start,
                                      AdapterBatch(bank, batch.slots, dropout_key, rate, row_block=row_block),
                                      batch.segment_ids,
                                      batch.positions)
        return token_cross_entropy(hidden, head, batch.targets, self.cfg.loss_chunk_tokens) * batch.weights

    def _loss_sums(self, factors, batch: Batch, dropout_key=None, base=None, row_block: int | None = None):
        """Each adapter's summed token loss and token count over the rows that use it, (K,) each."""
        token_loss = self.token_losses(factors, batch, dropout_key, base, row_block)
        k = len(self.names)
        sums = jax.ops.segment_sum(token_loss.sum(axis=1), batch.slots - 1, num_segments=k)
        counts = jax.ops.segment_sum(batch.weights.sum(axis=1), batch.slots - 1, num_segments=k)
        return sums, counts

    def adapter_losses(self, factors, batch: Batch, dropout_key=None, base=None, row_block: int | None = None
                       ) -> tuple[jax.Array, jax.Array]:
        """(the loss trained on: the sum over adapters, each adapter's token-mean loss (K,))."""
        sums, counts = self._loss_sums(factors, batch, dropout_key, base, row_block)
        losses = sums / jnp.maximum(counts, 1.0)
        return losses.sum(), losses

    def _train_step(self, train_state: TrainState, base, step, batch: Batch):
        """One optimizer step of every adapter on `batch`; base is the frozen model's state."""
        dropout_key = jax.random.fold_in(jax.random.key(self.cfg.seed), step) if self.cfg.dropout > 0 else None
        (_, losses), grads = jax.value_and_grad(self.adapter_losses, has_aux=True)(
            train_state.factors, batch, dropout_key, base, self.rows_per_adapter)
        updates, opt_state = self.optimizer.update(grads, train_state.opt_state, train_state.factors)
        return TrainState(optax.apply_updates(train_state.factors, updates), opt_state), losses

    def step(self, step: int, batch: Batch) -> jax.Array:
        """Train on batch `step`, updating train_state; returns each adapter's loss (K,)."""
        self.train_state, losses = self._step(self.train_state, self.state, jnp.int32(step), batch)
        return losses

    def _arrays(self, rows: list[list[Example]], slots: list[int], packed: bool) -> Batch:
        """The batch of these rows (each one example, or several when packed) on the mesh."""
        if packed:
            arrays = pack_batch(rows, self.cfg.seq_len, self.pad)
        else:
            arrays = pad_batch([examples[0] for examples in rows], self.cfg.seq_len, self.pad)
        sharding = self.plan.sharding(("batch", "seq"))
        return Batch(*(process_rows(a, sharding) for a in arrays[:3]),
                     process_rows(np.asarray(slots, np.int32), self.plan.sharding(("batch",))),
                     *(process_rows(a, sharding) for a in arrays[3:]))

    def rows(self, step: int) -> tuple[list[list[Example]], list[int]]:
        """Batch `step`'s rows, per_adapter of every adapter (each the examples it holds), and each row's slot."""
        per = self.rows_per_adapter
        rows, slots = [], []
        for i, name in enumerate(self.names):
            if self.cfg.packing:
                rows += self.streams[name].batch(step)
            else:
                rows += [[e] for e in draw(self.train_sets[name], step, per, self.cfg.seed + 1000 * i)]
            slots += [i + 1] * per
        return rows, slots

    def batch(self, step: int) -> Batch:
        """Batch `step`: per_adapter rows of every adapter, tagged with the adapter's slot."""
        return self._arrays(*self.rows(step), packed=self.cfg.packing)

    def evaluate(self) -> dict[str, float]:
        """Mean held-out token loss of each adapter (rows padding a chunk to the data axis carry no weight)."""
        totals = {}
        chunk_rows = 16 * self.plan.data_size
        for i, name in enumerate(self.names):
            held = self.eval_sets[name]
            loss_sum, token_count = 0.0, 0.0
            for start in range(0, len(held), chunk_rows):
                chunk = held[start:start + chunk_rows]
                filler = -len(chunk) % self.plan.data_size
                batch = self._arrays([[e] for e in chunk + chunk[:1] * filler], [i + 1] * (len(chunk) + filler),
                                     packed=False)
                if filler:
                    batch = batch._replace(weights=batch.weights.at[len(chunk):].set(0.0))
                sums, counts = map(to_host, self._eval(self.train_state.factors, batch, self.state))
                loss_sum, token_count = loss_sum + float(sums[i]), token_count + float(counts[i])
            if token_count:
                totals[name] = loss_sum / token_count
        return totals

    def fit(self, steps: int | None = None, progress: bool = True) -> list[dict]:
        """Train (resuming from the latest checkpoint in out_dir), logging metrics.jsonl and saving every save_every
        steps and after the last; returns this call's records."""
        import orbax.checkpoint as ocp
        from tqdm import tqdm

        out = Path(self.cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        leader = jax.process_index() == 0  # every process trains and saves its shards; process 0 logs
        manager = ocp.CheckpointManager((out / "checkpoints").resolve(),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep_last))
        first = 0
        if manager.latest_step() is not None:
            first = manager.latest_step()
            restored = manager.restore(first, args=ocp.args.StandardRestore(self.train_state._asdict()))
            self.train_state = TrainState(**restored)
        last = min(steps if steps is not None else self.cfg.steps, self.cfg.steps)
        records = []
        with (out / "metrics.jsonl").open("a") if leader else nullcontext() as log, tqdm(
                range(first, last), disable=not (progress and leader), desc="train", initial=first, total=last) as bar:
            for step in bar:
                started = time.perf_counter()
                losses = self.step(step, self.batch(step))
                losses = to_host(losses)
                record = {"step": step + 1, "loss": float(losses.mean()),
                          "adapter_loss": dict(zip(self.names, map(float, losses))),
                          "seconds": time.perf_counter() - started}
                if (step + 1) % self.cfg.eval_every == 0 or step + 1 == self.cfg.steps:
                    record["eval_loss"] = self.evaluate()
                if (step + 1) % self.cfg.save_every == 0 or step + 1 == last:
                    manager.save(step + 1, args=ocp.args.StandardSave(self.train_state._asdict()), force=True)
                if leader:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                records.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
        manager.wait_until_finished()
        manager.close()
        return records

    def export(self, out_dir: str | Path | None = None) -> dict[str, Path]:
        """Write every trained adapter as a PEFT directory under out_dir/adapters (or out_dir); every process gathers
        the factors, process 0 writes them."""
        root = Path(out_dir) if out_dir is not None else Path(self.cfg.out_dir) / "adapters"
        adapters = export(self.train_state.factors, self.spec, self.model_config, self.names,
                          base_model=None if is_demo_model(self.cfg.model) else str(self.cfg.model))
        if jax.process_index() != 0:
            return {a.name: root / a.name for a in adapters}
        return {a.name: write_adapter(a, root / a.name) for a in adapters}
