"""Llama in Flax NNX (GQA, RoPE with llama3 scaling, RMSNorm, SwiGLU) with per-row adapters, sharded by logical axes.

One forward serves full-sequence scoring, prefill and one-token decode: tokens (batch, seq) start at
`start` (batch,) and, when a KV cache is given, are written into it and attend to everything before them.
`Llama.ragged` runs one ragged step over a paged KV cache instead: any mix of requests' decode tokens and prompt
chunks, each token with its own adapter slot, its keys and values written into its request's pages.
Every parameter is an nnx.Param carrying `logical_axes`; the ShardingPlan turns those into placements.
Linear layers run as shard_map blocks (adapters/linear.py) so the adapter collectives are exactly the
strategy's; attention, norms and embeddings are left to GSPMD.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from ..adapters.bank import bank_key
from ..adapters.linear import LinearSpecs, adapted_linear
from ..adapters.operands import CompressedOperand, LoraOperand
from ..adapters.routing import Routing, dense_groups, route_blocks, route_shard
from ..config import LORA_MODULES, ModelConfig
from ..sharding import (
    KEY_CACHE_AXES,
    PAGE_AXES,
    VALUE_CACHE_AXES,
    ShardingPlan,
    compressed_axes,
    factor_axes,
    weight_axes,
)
from .attention import block_causal_attention, reference_attention
from .paged_attention import paged_attention
from .paged_kernel import sharded_paged_attention

Bank = dict[str, tuple[jax.Array, jax.Array]]
KVCache = tuple[tuple[jax.Array, jax.Array], ...]
PagedKV = tuple[tuple[jax.Array, jax.Array], ...]  # per layer (key pages, value pages), PAGE_AXES each
QUERY_BLOCK = 64  # queries per block of attention without a cache (measured fastest on CPU at 128 and 256 tokens)


class AdapterBatch(NamedTuple):
    """The adapter bank, the slot each batch row uses (slot 0 = no adapter), and LoRA dropout when training.

    Optionally a compressed bank (adapters/compressed.py: (V, U, Σ) per module it adapts) with each row's cluster
    and Σ id (Σ id 0 = no compressed adapter). groups: the distinct bank slots the batch uses, ascending, padded
    with 0; its length bounds the adapter groups of the forward's routing (None: every slot of the bank), so a
    caller that knows its batch uses few adapters gets one factor copy per adapter instead of one per token.
    row_block: the caller's promise that rows come in aligned blocks of this many rows sharing one slot (training
    batches); the xla adapter path then multiplies each block's contiguous tokens, without grouping them.
    """

    bank: Bank
    slots: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: jax.Array | None = None
    compressed: dict[str, tuple[jax.Array, jax.Array, jax.Array]] | None = None
    clusters: jax.Array | None = None
    sigma_ids: jax.Array | None = None
    groups: jax.Array | None = None
    row_block: int | None = None


class RaggedBatch(NamedTuple):
    """Where one ragged step's tokens go in a paged KV cache (layouts in model/paged_attention.py): each request's
    page table (R, pages_per_request), its tokens in the cache once this step is written (R,), and its query tokens
    this step (R,). The step's tokens are the requests' query tokens back to back, then padding."""

    page_tables: jax.Array
    kv_lens: jax.Array
    q_lens: jax.Array


class TokenPlaces(NamedTuple):
    """Each token of a ragged step: its position in its request, and the page and offset its keys and values go to
    (page num_pages for a padding token: its write is dropped)."""

    positions: jax.Array
    pages: jax.Array
    offsets: jax.Array


def token_places(batch: RaggedBatch, tokens: int, page_size: int, num_pages: int) -> TokenPlaces:
    """The TokenPlaces of a ragged step of `tokens` tokens (padding included)."""
    ends = jnp.cumsum(batch.q_lens)
    index = jnp.arange(tokens, dtype=jnp.int32)
    request = jnp.searchsorted(ends, index, side="right")
    real = request < batch.q_lens.shape[0]
    request = jnp.minimum(request, batch.q_lens.shape[0] - 1)
    positions = jnp.where(real, batch.kv_lens[request] - ends[request] + index, 0).astype(jnp.int32)
    pages = jnp.where(real, batch.page_tables[request, positions // page_size], num_pages)
    return TokenPlaces(positions, pages.astype(jnp.int32), (positions % page_size).astype(jnp.int32))


def slot_groups(slots, num_groups: int) -> np.ndarray:
    """The distinct non-zero slots of host-side `slots`, ascending, padded with 0 to num_groups entries."""
    used = np.unique(np.asarray(slots))
    used = used[used > 0]
    if len(used) > num_groups:
        raise ValueError(f"{len(used)} distinct adapter slots exceed num_groups={num_groups}")
    return np.concatenate([used, np.zeros(num_groups - len(used), used.dtype)]).astype(np.int32)


def route(adapters: AdapterBatch, seq: int, plan: ShardingPlan, kernels: bool) -> Routing:
    """The forward's Routing, built once per data shard (a shard_map over the batch) and shared by every module."""
    row = plan.spec(("batch",))
    if adapters.row_block is not None and not kernels and adapters.compressed is None:
        return jax.shard_map(lambda slots: route_blocks(slots, adapters.row_block), mesh=plan.mesh, in_specs=row,
                             out_specs=row)(adapters.slots)
    first_a = next(iter(adapters.bank.values()))[0]
    groups = adapters.groups if adapters.groups is not None else jnp.arange(1, first_a.shape[0], dtype=jnp.int32)
    compressed = adapters.compressed is not None
    num_clusters = next(iter(adapters.compressed.values()))[0].shape[0] if compressed else 0

    def shard(slots, groups, clusters, sigma_ids):
        return route_shard(slots, seq, groups, kernels=kernels, clusters=clusters if compressed else None,
                           sigma_ids=sigma_ids, num_clusters=num_clusters,
                           dense=dense_groups(slots.shape[0] * seq, groups.shape[0]))

    ids = (adapters.clusters, adapters.sigma_ids) if compressed else (adapters.slots, adapters.slots)
    return jax.shard_map(shard, mesh=plan.mesh, in_specs=(row, PartitionSpec(), row, row), out_specs=row)(
        adapters.slots, groups, *ids)


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
    """Rotate (batch, seq, heads, head_dim) by position, in the rotate-half convention of HF Llama.

    The halves are an axis of two, so rotate-half is a flip of that axis (one elementwise pass forward and back)."""
    angles = positions[..., None, None, None].astype(jnp.float32) * jnp.asarray(inv_freq)  # (batch, seq, 1, 1, half)
    halves = x.astype(jnp.float32).reshape(x.shape[:-1] + (2, x.shape[-1] // 2))
    sign = jnp.asarray([[-1.0], [1.0]], jnp.float32)
    rotated = halves * jnp.cos(angles) + jnp.flip(halves, axis=-2) * (sign * jnp.sin(angles))
    return rotated.reshape(x.shape).astype(x.dtype)


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

    lora_impl is a resolved one (RESOLVED_LORA_IMPLS): "xla", "pallas" (Triton kernels) or "pallas_interpret".
    """

    def __init__(self, config: ModelConfig, modules: tuple[str, ...], plan: ShardingPlan, dtype, rngs: nnx.Rngs,
                 lora_impl: str = "xla"):
        for module in modules:
            d_in, d_out = config.module_dims(module)
            setattr(self, module, _param(rngs, (d_in, d_out), weight_axes(module), dtype, d_in ** -0.5))
        self.plan = plan
        self.lora_impl = lora_impl

    def apply(self, module: str, x: jax.Array, layer: int, adapters: AdapterBatch | None,
              routing: Routing | None) -> jax.Array:
        plan = self.plan
        w_axes = weight_axes(module)
        operands = []
        if adapters is not None:
            key = bank_key(layer, module)
            dropout = None
            if adapters.dropout_key is not None:
                index = layer * len(LORA_MODULES) + LORA_MODULES.index(module)
                dropout = (jax.random.fold_in(adapters.dropout_key, index), adapters.dropout_rate)
            a_spec, b_spec = (plan.spec(axes) for axes in factor_axes(module, plan.block_factors))
            operands.append(LoraOperand(*adapters.bank[key], a_spec, b_spec, self.lora_impl, dropout))
            if adapters.compressed is not None and key in adapters.compressed:
                specs = (plan.spec(axes) for axes in compressed_axes(module, plan.block_factors))
                operands.append(CompressedOperand(*adapters.compressed[key], *specs))
        specs = LinearSpecs(plan.mesh, plan.spec(("batch", "seq", w_axes[0])), plan.spec(w_axes),
                            plan.spec(("batch", "seq", w_axes[1])), plan.spec(("batch",)))
        return adapted_linear(x, getattr(self, module)[...], specs, operands, routing)


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

    def _projections(self, x, positions, inv_freq, adapters, routing):
        """q (batch, seq, heads, head_dim), k and v (batch, seq, kv_heads, head_dim), q and k rotated."""
        cfg, layer = self.config, self.index
        batch, seq = x.shape[:2]
        q = self.attn.apply("q_proj", x, layer, adapters, routing).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        k = self.attn.apply("k_proj", x, layer, adapters, routing).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = self.attn.apply("v_proj", x, layer, adapters, routing).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend_pages(self, x, places: TokenPlaces, inv_freq, pages, batch: RaggedBatch, adapters, routing,
                        query_block: int):
        """Attention of a ragged step's tokens (rows of one token) through the layer's pages, which get this step's
        keys and values first; returns (o_proj output, the layer's new pages)."""
        cfg = self.config
        tokens = x.shape[0]
        q, k, v = self._projections(x, places.positions[:, None], inv_freq, adapters, routing)

        def write(pool, new):
            pool = pool.at[places.pages, :, places.offsets].set(new[:, 0].astype(pool.dtype), mode="drop")
            return self._constrain(pool, PAGE_AXES)

        pages = (write(pages[0], k), write(pages[1], v))
        groups = cfg.num_heads // cfg.num_kv_heads
        grouped = q.reshape(tokens, cfg.num_kv_heads, groups, cfg.head_dim)
        operands = (grouped, *pages, batch.page_tables, batch.kv_lens, batch.q_lens)
        if self.attn.lora_impl == "xla":
            out = paged_attention(*operands, scale=cfg.head_dim ** -0.5, block=query_block)
        else:  # the Pallas kernel, in its own query blocks
            out = sharded_paged_attention(self.plan, *operands, scale=cfg.head_dim ** -0.5,
                                          interpret=self.attn.lora_impl == "pallas_interpret")
        out = out.astype(x.dtype).reshape(tokens, 1, cfg.q_dim)
        return self.attn.apply("o_proj", out, self.index, adapters, routing), pages

    def attention(self, x, positions, inv_freq, cache, start, adapters, routing, segment_ids=None):
        cfg, layer = self.config, self.index
        batch, seq = x.shape[:2]
        q, k, v = self._projections(x, positions, inv_freq, adapters, routing)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (batch, kv_heads, seq, head_dim)
        if cache is None:
            keys, values, key_positions = k, v, positions
        else:  # the key cache holds keys transposed, (batch, kv_heads, head_dim, positions)
            def write(c, new, axis):
                return jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice_in_dim(c, new, s, axis=axis))(
                    c, new.astype(c.dtype), start)

            keys = self._constrain(write(cache[0], k.transpose(0, 1, 3, 2), 2), KEY_CACHE_AXES)
            values = self._constrain(write(cache[1], v, 1), VALUE_CACHE_AXES)
            key_positions = jnp.broadcast_to(jnp.arange(values.shape[2]), (batch, values.shape[2]))
            cache = (keys, values)
        out = self._attend(q, keys, values, positions, key_positions, segment_ids, causal_blocks=cache is None,
                           keys_transposed=cache is not None)
        return self.attn.apply("o_proj", out.reshape(batch, seq, cfg.q_dim), layer, adapters, routing), cache

    def _attend(self, q, keys, values, positions, key_positions, segment_ids=None, causal_blocks=False,
                keys_transposed=False):
        """Causal GQA attention in float32; kv heads are repeated when they are replicated (the fallback).

        With segment_ids (packed rows, no cache) a token attends only to earlier tokens of its own segment.
        causal_blocks (keys are this call's own tokens, in order): queries go in blocks of QUERY_BLOCK, each against
        the keys up to its own end, as every later key is masked for all of them (model/attention.py).
        keys_transposed: keys come as the key cache holds them, (batch, kv_heads, head_dim, positions)."""
        cfg = self.config
        batch, seq = q.shape[:2]
        mask = key_positions[:, None, :] <= positions[:, :, None]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :] == segment_ids[:, :, None])
        scale = cfg.head_dim ** -0.5
        groups = cfg.num_heads // cfg.num_kv_heads
        if self.plan.kv_replicated:
            def per_query_head(axes):
                return tuple("q_heads" if axis == "kv_heads" else axis for axis in axes)

            key_axes = KEY_CACHE_AXES if keys_transposed else VALUE_CACHE_AXES  # keys untransposed: the values' order
            keys = self._constrain(jnp.repeat(keys, groups, axis=1), per_query_head(key_axes))
            values = self._constrain(jnp.repeat(values, groups, axis=1), per_query_head(VALUE_CACHE_AXES))
            grouped = q[:, :, :, None]  # every query head its own (repeated) kv head
        else:
            grouped = q.reshape(batch, seq, cfg.num_kv_heads, groups, cfg.head_dim)
        if seq == 1:
            keys_t = keys if keys_transposed else jnp.swapaxes(keys, 2, 3)
            return self._attend_one(grouped[:, 0], keys_t, values, mask[:, 0], scale).reshape(q.shape)
        if keys_transposed:
            keys = jnp.swapaxes(keys, 2, 3)
        if causal_blocks:
            out = block_causal_attention(grouped, keys, values, mask, scale, QUERY_BLOCK)
        else:
            out = reference_attention(grouped, keys, values, mask, scale)
        return out.astype(q.dtype).reshape(batch, seq, cfg.num_heads, cfg.head_dim)

    @staticmethod
    def _attend_one(q, keys_t, values, mask, scale):
        """One query token per row (decode), q (batch, kv_heads, groups, head_dim), keys_t (batch, kv_heads,
        head_dim, positions): products and sums over the cache in float32, as fused loops whose sums run over a
        middle axis (head_dim for the scores, positions for the output), vectorised along the last; as batched
        matmuls these are a tiny GEMV per (row, kv head)."""
        keys_t, values = keys_t.astype(jnp.float32), values.astype(jnp.float32)
        scores = jnp.sum(q.astype(jnp.float32)[..., None] * keys_t[:, :, None], axis=-2) * scale
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.sum(probs[..., None] * values[:, :, None], axis=-2).astype(q.dtype)

    def __call__(self, x, positions, inv_freq, cache, start, adapters, routing, segment_ids=None):
        h, cache = self.attention(self.input_norm(x), positions, inv_freq, cache, start, adapters, routing,
                                  segment_ids)
        return self._mlp_block(x + h, adapters, routing), cache

    def ragged(self, x, places, inv_freq, pages, batch, adapters, routing, query_block):
        """The layer over a ragged step's tokens (rows of one token) through its paged KV cache."""
        h, pages = self.attend_pages(self.input_norm(x), places, inv_freq, pages, batch, adapters, routing,
                                        query_block)
        return self._mlp_block(x + h, adapters, routing), pages

    def _mlp_block(self, x, adapters, routing):
        """x plus the SwiGLU MLP of its post-attention norm."""
        y = self.post_attention_norm(x)
        gate = self.mlp.apply("gate_proj", y, self.index, adapters, routing)
        up = self.mlp.apply("up_proj", y, self.index, adapters, routing)
        hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(y.dtype)
        return x + self.mlp.apply("down_proj", hidden, self.index, adapters, routing)


class Llama(nnx.Module):
    """The decoder: embeddings, layers, final norm and LM head (tied to the embeddings if configured)."""

    def __init__(self, config: ModelConfig, plan: ShardingPlan, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 lora_impl: str = "xla"):
        self.config = config
        self.plan = plan
        self.lora_impl = lora_impl
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
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits (batch, seq, vocab) in float32 for tokens placed at positions start + [0, seq); with logits_at
        (batch,), each row's logits at that one position, (batch, vocab), the LM head multiplying only those."""
        x, new_cache = self.hidden_states(tokens, start, cache, adapters)
        if logits_at is None:
            return self.logits(x), new_cache
        return self.logits(jnp.take_along_axis(x, logits_at[:, None, None], axis=1))[:, 0], new_cache

    def logits(self, x: jax.Array) -> jax.Array:
        """The LM head on final-normed hidden states (batch, seq, hidden): float32 logits (batch, seq, vocab)."""
        logits = jnp.einsum("bsd,dv->bsv", x, self.head_weight(), preferred_element_type=jnp.float32)
        return jax.lax.with_sharding_constraint(logits, self.plan.sharding(("batch", "seq", "vocab")))

    def ragged(self, tokens: jax.Array, pages: PagedKV, batch: RaggedBatch, adapters: AdapterBatch | None = None,
               query_block: int = 16, logits_at: jax.Array | None = None) -> tuple[jax.Array, PagedKV]:
        """Logits (T, vocab) in float32 of a ragged step's tokens (T,) and the new pages: each token's keys and
        values go into its request's pages, and it attends to its request's keys up to its own position. With
        logits_at (n,) token indices, only those tokens' logits (n, vocab), the LM head multiplying only those.

        adapters.slots (and clusters, Σ ids) are per token; padding tokens past the requests' get logits too, from
        nothing that a request reads; `query_block` tokens of one request share one gather of its pages."""
        plan = self.plan
        num_pages, _, page_size, _ = pages[0][0].shape
        places = token_places(batch, tokens.shape[0], page_size, num_pages)
        inv_freq = rope_frequencies(self.config)
        x = jnp.take(self.embed[...], tokens, axis=0)[:, None]
        x = jax.lax.with_sharding_constraint(x, plan.sharding(("batch", "seq", "embed")))
        routing = None if adapters is None else route(adapters, 1, plan, self.lora_impl != "xla")
        new_pages = []
        for layer, layer_pages in zip(self.layers, pages):
            x, layer_pages = layer.ragged(x, places, inv_freq, layer_pages, batch, adapters, routing, query_block)
            new_pages.append(layer_pages)
        x = self.norm(x) if logits_at is None else self.norm(x[logits_at])
        return self.logits(x)[:, 0], tuple(new_pages)

    def head_weight(self) -> jax.Array:
        """The LM head (hidden, vocab): the embeddings transposed when tied."""
        return self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def hidden_states(self, tokens: jax.Array, start: jax.Array, cache: KVCache | None = None,
                      adapters: AdapterBatch | None = None, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """The final-normed hidden states (batch, seq, hidden) the LM head reads.

        Packed rows (training, no cache) give segment_ids (batch, seq), attention staying within a segment, and
        their own positions (batch, seq), restarting per segment; without them positions are start + [0, seq)."""
        plan = self.plan
        if positions is None:
            positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        inv_freq = rope_frequencies(self.config)
        x = jnp.take(self.embed[...], tokens, axis=0)
        x = jax.lax.with_sharding_constraint(x, plan.sharding(("batch", "seq", "embed")))
        routing = None if adapters is None else route(adapters, tokens.shape[1], plan, self.lora_impl != "xla")
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, inv_freq, None if cache is None else cache[i], start, adapters,
                                   routing, segment_ids)
            new_cache.append(layer_cache)
        return self.norm(x), (None if cache is None else tuple(new_cache))


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


def cache_shapes(config: ModelConfig, batch: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's key cache (batch, kv_heads, head_dim, length) and value cache (batch, kv_heads, length,
    head_dim), laid out as KEY_CACHE_AXES and VALUE_CACHE_AXES."""
    return ((batch, config.num_kv_heads, config.head_dim, length), (batch, config.num_kv_heads, length, config.head_dim))


def init_cache(config: ModelConfig, plan: ShardingPlan, batch: int, max_seq_len: int, dtype=jnp.float32) -> KVCache:
    """A zero KV cache (keys transposed, values) per layer, sharded on batch and kv heads."""
    shapes = cache_shapes(config, batch, max_seq_len)
    shardings = (plan.sharding(KEY_CACHE_AXES), plan.sharding(VALUE_CACHE_AXES))
    make = jax.jit(lambda: tuple(tuple(jnp.zeros(shape, dtype) for shape in shapes) for _ in range(config.num_layers)),
                   out_shardings=tuple(shardings for _ in range(config.num_layers)))
    return make()


def init_pages(config: ModelConfig, plan: ShardingPlan, num_pages: int, page_size: int, dtype=jnp.float32) -> PagedKV:
    """A zero paged KV cache: per layer, key and value pools of num_pages pages of page_size tokens, split by kv heads."""
    shape = (num_pages, config.num_kv_heads, page_size, config.head_dim)
    sharding = plan.sharding(PAGE_AXES)
    make = jax.jit(lambda: tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)),
                   out_shardings=tuple((sharding, sharding) for _ in range(config.num_layers)))
    return make()


def abstract_cache(config: ModelConfig, plan: ShardingPlan, batch: int, max_seq_len: int, dtype=jnp.float32) -> KVCache:
    """Shapes and shardings of a KV cache without allocating it."""
    leaves = tuple(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=plan.sharding(axes))
                   for shape, axes in zip(cache_shapes(config, batch, max_seq_len), (KEY_CACHE_AXES, VALUE_CACHE_AXES)))
    return tuple(leaves for _ in range(config.num_layers))


def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens, start, cache=None, adapters=None, logits_at=None):
    """Functional entry point for jit: rebuild the module from its state and run it."""
    return nnx.merge(graphdef, state)(tokens, start, cache, adapters, logits_at)


def ragged_forward(graphdef: nnx.GraphDef, state: nnx.State, tokens, pages, batch, adapters=None, query_block=16,
                   logits_at=None):
    """Functional entry point of Llama.ragged for jit (query_block static)."""
    return nnx.merge(graphdef, state).ragged(tokens, pages, batch, adapters, query_block, logits_at)


def forward_hidden(graphdef: nnx.GraphDef, state: nnx.State, tokens, start, adapters=None, segment_ids=None,
                   positions=None) -> tuple[jax.Array, jax.Array]:
    """(final hidden states, LM head weight) without the logits, for losses that apply the head themselves."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(tokens, start, None, adapters, segment_ids, positions)
    return hidden, model.head_weight()
