"""Llama in Flax NNX (GQA, RoPE with llama3 scaling, RMSNorm, SwiGLU) with per-row adapters, sharded by logical axes.

One forward serves full-sequence scoring, prefill and one-token decode: tokens (batch, seq) start at
`start` (batch,) and, when a KV cache is given, are written into it and attend to everything before them.
Every parameter is an nnx.Param carrying `logical_axes`; the ShardingPlan turns those into placements.
Linear layers run as shard_map blocks (lora/linear.py) so the adapter collectives are exactly the
strategy's; attention, norms and embeddings are left to GSPMD.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import LORA_MODULES, ModelConfig
from ..lora.bank import bank_key, factor_axes, weight_axes
from ..lora.compressed import compressed_axes
from ..lora.linear import adapted_linear
from ..sharding import ShardingPlan

Bank = dict[str, tuple[jax.Array, jax.Array]]
KVCache = tuple[tuple[jax.Array, jax.Array], ...]
CACHE_AXES = ("batch", None, "kv_heads", "head_dim")


class AdapterBatch(NamedTuple):
    """The adapter bank, the slot each batch row uses (slot 0 = no adapter), and LoRA dropout when training.

    Optionally a compressed bank (lora/compressed.py: (V, U, Σ) per module it adapts) with each row's cluster
    and Σ id (Σ id 0 = no compressed adapter).
    """

    bank: Bank
    slots: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: jax.Array | None = None
    compressed: dict[str, tuple[jax.Array, jax.Array, jax.Array]] | None = None
    clusters: jax.Array | None = None
    sigma_ids: jax.Array | None = None


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies (head_dim/2,), with Llama-3.1 "llama3" scaling when configured."""
    inv = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    s = config.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    scaled = np.where(medium, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate (batch, seq, heads, head_dim) by position, in the rotate-half convention of HF Llama."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, dtype, std: float) -> nnx.Param:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Linears(nnx.Module):
    """The adapted linear weights of one layer, (d_in, d_out) each, applied with the layer's bank slice.

    lora_impl is lora.linear's `impl`: "xla", "pallas" (Triton kernels) or "pallas_interpret".
    """

    def __init__(self, config: ModelConfig, modules: tuple[str, ...], plan: ShardingPlan, dtype, rngs: nnx.Rngs,
                 lora_impl: str = "xla"):
        for module in modules:
            d_in, d_out = config.module_dims(module)
            setattr(self, module, _param(rngs, (d_in, d_out), weight_axes(module), dtype, d_in ** -0.5))
        self.plan = plan
        self.lora_impl = lora_impl

    def apply(self, module: str, x: jax.Array, layer: int, adapters: AdapterBatch | None) -> jax.Array:
        plan = self.plan
        w_axes = weight_axes(module)
        lora = factor_specs = slots = dropout = compressed = compressed_specs = compressed_rows = None
        if adapters is not None:
            lora = adapters.bank[bank_key(layer, module)]
            factor_specs = tuple(plan.spec(axes) for axes in factor_axes(module, plan.block_factors))
            slots = adapters.slots
            if adapters.dropout_key is not None:
                index = layer * len(LORA_MODULES) + LORA_MODULES.index(module)
                dropout = (jax.random.fold_in(adapters.dropout_key, index), adapters.dropout_rate)
            if adapters.compressed is not None and bank_key(layer, module) in adapters.compressed:
                compressed = adapters.compressed[bank_key(layer, module)]
                compressed_specs = tuple(plan.spec(axes) for axes in compressed_axes(module, plan.block_factors))
                compressed_rows = (adapters.clusters, adapters.sigma_ids)
        return adapted_linear(
            x,
            getattr(self, module)[...],
            lora,
            slots,
            mesh=plan.mesh,
            x_spec=plan.spec(("batch", "seq", w_axes[0])),
            w_spec=plan.spec(w_axes),
            out_spec=plan.spec(("batch", "seq", w_axes[1])),
            factor_specs=factor_specs,
            slot_spec=plan.spec(("batch",)),
            impl=self.lora_impl,
            dropout=dropout,
            compressed=compressed,
            compressed_specs=compressed_specs,
            compressed_rows=compressed_rows,
        )


class DecoderLayer(nnx.Module):
    """Pre-norm attention + SwiGLU MLP block."""

    def __init__(self, config: ModelConfig, index: int, plan: ShardingPlan, dtype, rngs: nnx.Rngs,
                 lora_impl: str = "xla"):
        self.index = index
        self.config = config
        self.plan = plan
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Linears(config, ("q_proj", "k_proj", "v_proj", "o_proj"), plan, dtype, rngs, lora_impl)
        self.mlp = Linears(config, ("gate_proj", "up_proj", "down_proj"), plan, dtype, rngs, lora_impl)

    def _constrain(self, x: jax.Array, axes: tuple) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.plan.sharding(axes))

    def attention(self, x, positions, inv_freq, cache, start, adapters):
        cfg, layer = self.config, self.index
        batch, seq = x.shape[:2]
        q = self.attn.apply("q_proj", x, layer, adapters).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        k = self.attn.apply("k_proj", x, layer, adapters).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = self.attn.apply("v_proj", x, layer, adapters).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if cache is None:
            keys, values, key_positions = k, v, positions
        else:
            write = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice_in_dim(c, new, s, axis=0))
            keys = self._constrain(write(cache[0], k.astype(cache[0].dtype), start), CACHE_AXES)
            values = self._constrain(write(cache[1], v.astype(cache[1].dtype), start), CACHE_AXES)
            key_positions = jnp.broadcast_to(jnp.arange(keys.shape[1]), (batch, keys.shape[1]))
            cache = (keys, values)
        out = self._attend(q, keys, values, positions, key_positions)
        return self.attn.apply("o_proj", out.reshape(batch, seq, cfg.q_dim), layer, adapters), cache

    def _attend(self, q, keys, values, positions, key_positions):
        """Causal GQA attention in float32; kv heads are repeated when they are replicated (the fallback)."""
        cfg = self.config
        batch, seq = q.shape[:2]
        mask = key_positions[:, None, :] <= positions[:, :, None]
        scale = cfg.head_dim ** -0.5
        if self.plan.kv_replicated:
            groups = cfg.num_heads // cfg.num_kv_heads
            keys = self._constrain(jnp.repeat(keys, groups, axis=2), ("batch", None, "q_heads", "head_dim"))
            values = self._constrain(jnp.repeat(values, groups, axis=2), ("batch", None, "q_heads", "head_dim"))
            scores = jnp.einsum("bshd,bthd->bhst", q, keys, preferred_element_type=jnp.float32) * scale
            scores = jnp.where(mask[:, None], scores, -jnp.inf)
            probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
            return jnp.einsum("bhst,bthd->bshd", probs, values, preferred_element_type=jnp.float32).astype(q.dtype)
        groups = cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(batch, seq, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bskgd,btkd->bkgst", qg, keys, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, values, preferred_element_type=jnp.float32)
        return out.astype(q.dtype).reshape(batch, seq, cfg.num_heads, cfg.head_dim)

    def __call__(self, x, positions, inv_freq, cache, start, adapters):
        h, cache = self.attention(self.input_norm(x), positions, inv_freq, cache, start, adapters)
        x = x + h
        y = self.post_attention_norm(x)
        gate = self.mlp.apply("gate_proj", y, self.index, adapters)
        up = self.mlp.apply("up_proj", y, self.index, adapters)
        hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(y.dtype)
        return x + self.mlp.apply("down_proj", hidden, self.index, adapters), cache


class Llama(nnx.Module):
    """The decoder: embeddings, layers, final norm and LM head (tied to the embeddings if configured)."""

    def __init__(self, config: ModelConfig, plan: ShardingPlan, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 lora_impl: str = "xla"):
        self.config = config
        self.plan = plan
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype, 1.0)
        self.layers = nnx.List([DecoderLayer(config, i, plan, dtype, rngs, lora_impl)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), dtype,
                                  config.hidden_size ** -0.5)

    def __call__(
        self,
        tokens: jax.Array,
        start: jax.Array,
        cache: KVCache | None = None,
        adapters: AdapterBatch | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits (batch, seq, vocab) in float32 for tokens placed at positions start + [0, seq)."""
        plan = self.plan
        positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        inv_freq = rope_frequencies(self.config)
        x = jnp.take(self.embed[...], tokens, axis=0)
        x = jax.lax.with_sharding_constraint(x, plan.sharding(("batch", "seq", "embed")))
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, inv_freq, None if cache is None else cache[i], start, adapters)
            new_cache.append(layer_cache)
        x = self.norm(x)
        head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("bsd,dv->bsv", x, head, preferred_element_type=jnp.float32)
        logits = jax.lax.with_sharding_constraint(logits, plan.sharding(("batch", "seq", "vocab")))
        return logits, (None if cache is None else tuple(new_cache))


def param_shardings(abstract_state: nnx.State, plan: ShardingPlan):
    """NamedSharding for every parameter, from its `logical_axes` metadata."""
    return jax.tree.map(
        lambda v: plan.sharding(v.get_metadata()["logical_axes"]),
        abstract_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def abstract_model(config: ModelConfig, plan: ShardingPlan, dtype=jnp.float32,
                   lora_impl: str = "xla") -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and parameter shapes, nothing allocated; lora_impl only changes the graph, not the state."""
    return nnx.split(nnx.eval_shape(lambda: Llama(config, plan, dtype=dtype, rngs=nnx.Rngs(0), lora_impl=lora_impl)))


def init_model(config: ModelConfig, plan: ShardingPlan, dtype=jnp.float32, seed: int = 0,
               lora_impl: str = "xla") -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights (for tests, the demo and benchmarks), created directly in their shardings."""
    graphdef, abstract_state = abstract_model(config, plan, dtype, lora_impl)
    shardings = param_shardings(abstract_state, plan)

    def make():
        return nnx.state(Llama(config, plan, dtype=dtype, rngs=nnx.Rngs(seed), lora_impl=lora_impl))

    state = jax.jit(make, out_shardings=shardings)()
    return graphdef, state


def init_cache(config: ModelConfig, plan: ShardingPlan, batch: int, max_seq_len: int, dtype=jnp.float32) -> KVCache:
    """A zero KV cache (batch, max_seq_len, kv_heads, head_dim) per layer, sharded on batch and kv heads."""
    shape = (batch, max_seq_len, config.num_kv_heads, config.head_dim)
    sharding = plan.sharding(CACHE_AXES)
    make = jax.jit(lambda: tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)),
                   out_shardings=tuple((sharding, sharding) for _ in range(config.num_layers)))
    return make()


def abstract_cache(config: ModelConfig, plan: ShardingPlan, batch: int, max_seq_len: int, dtype=jnp.float32) -> KVCache:
    """Shapes and shardings of a KV cache without allocating it."""
    shape = (batch, max_seq_len, config.num_kv_heads, config.head_dim)
    leaf = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=plan.sharding(CACHE_AXES))
    return tuple((leaf, leaf) for _ in range(config.num_layers))


def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens, start, cache=None, adapters=None):
    """Functional entry point for jit: rebuild the module from its state and run it."""
    return nnx.merge(graphdef, state)(tokens, start, cache, adapters)
