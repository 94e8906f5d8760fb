"""Causal attention of a sequence over its own keys, in blocks of queries, with a backward pass of its own.

Each block of `block` queries meets only the keys up to its own end, since every later key is masked for all of
them: at 256 tokens and blocks of 64 that is 10 of the 16 query-key tiles. The backward pass reuses the forward's
probabilities and works per block too; autodiff of the same loop (the reference, `reference_attention` over all
keys, gives the same values) spent most of its time slicing, padding and summing the blocks' gradients.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _blocks(seq: int, block: int) -> list[tuple[int, int]]:
    return [(lo, min(seq, lo + block)) for lo in range(0, seq, block)]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Masked softmax attention over all keys: q (batch, seq, kv_heads, groups, head_dim), k and v
    (batch, kv_heads, seq, head_dim), mask (batch, seq, seq) -> (batch, seq, kv_heads, groups, head_dim) float32."""
    scores = jnp.einsum("bqkgd,bktd->bkgqt", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bkgqt,bktd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                           block: int) -> jax.Array:
    """reference_attention for a mask that is causal (a query never sees a later key), queries `block` at a time.

    Every query must see at least one key (its own)."""
    return _forward(q, k, v, mask, scale, block)[0]


def _forward(q, k, v, mask, scale, block):
    """The output and what the backward pass needs: the operands, the output and each block's probabilities."""
    outs, probs = [], []
    for lo, hi in _blocks(q.shape[1], block):
        scores = jnp.einsum("bqkgd,bktd->bkgqt", q[:, lo:hi], k[:, :, :hi],
                            preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(jnp.where(mask[:, None, None, lo:hi, :hi], scores, -jnp.inf), axis=-1)
        probs.append(p)
        outs.append(jnp.einsum("bkgqt,bktd->bqkgd", p.astype(v.dtype), v[:, :, :hi],
                               preferred_element_type=jnp.float32))
    out = jnp.concatenate(outs, axis=1)
    return out, (q, k, v, out, probs)


def _backward(scale, block, residuals, d_out):
    """Gradients of q, k and v: per block, dp = d_out·vᵀ and the softmax's ds = p·(dp - Σ d_out·out)·scale."""
    q, k, v, out, probs = residuals
    f32 = jnp.float32
    d_out = d_out.astype(f32)
    row_dot = jnp.sum(d_out * out, axis=-1).transpose(0, 2, 3, 1)  # (batch, kv_heads, groups, seq)
    seq = k.shape[2]
    dk, dv, dqs = jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32), []
    for (lo, hi), p in zip(_blocks(q.shape[1], block), probs):
        d_block = d_out[:, lo:hi]
        dp = jnp.einsum("bqkgd,bktd->bkgqt", d_block, v[:, :, :hi], preferred_element_type=f32)
        ds = p * (dp - row_dot[..., lo:hi, None]) * scale
        dqs.append(jnp.einsum("bkgqt,bktd->bqkgd", ds, k[:, :, :hi], preferred_element_type=f32))
        tail = ((0, 0), (0, 0), (0, seq - hi), (0, 0))
        dk = dk + jnp.pad(jnp.einsum("bkgqt,bqkgd->bktd", ds, q[:, lo:hi], preferred_element_type=f32), tail)
        dv = dv + jnp.pad(jnp.einsum("bkgqt,bqkgd->bktd", p, d_block, preferred_element_type=f32), tail)
    dq = jnp.concatenate(dqs, axis=1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


block_causal_attention.defvjp(_forward, _backward)
