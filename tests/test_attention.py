"""Causal attention in query blocks, with its own backward pass, equals masked attention over all keys, values and
gradients, for packed rows (segments) and plain causal rows, grouped and one-per-head kv heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdlora_jax.model.attention import block_causal_attention, reference_attention
from bdlora_jax.model.llama import apply_rope


def _packed_mask(rng, batch, seq):
    """Causal within random segments of each row, as packed training rows are, with a padding tail."""
    segments = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        start, segment = 0, 1
        while start < seq - 5:
            length = int(rng.integers(1, seq // 2))
            segments[row, start:start + length] = segment
            start, segment = start + length, segment + 1
    positions = np.arange(seq)
    causal = positions[None, :, None] >= positions[None, None, :]
    return jnp.asarray(causal & (segments[:, :, None] == segments[:, None, :]))


@pytest.mark.parametrize("kv_heads,groups,block", [(2, 3, 16), (6, 1, 16), (2, 2, 64), (2, 2, 23)])
@pytest.mark.parametrize("packed", [False, True])
def test_block_causal_attention_equals_the_reference_with_its_gradients(kv_heads, groups, block, packed):
    rng = np.random.default_rng(0)
    batch, seq, dim = 3, 50, 8
    q = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, groups, dim), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, seq, dim), np.float32)) for _ in range(2))
    weights = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, groups, dim), np.float32))
    if packed:
        mask = _packed_mask(rng, batch, seq)
    else:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
    scale = dim ** -0.5

    def loss(attend):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * weights), argnums=(0, 1, 2)))

    blocked = loss(lambda q, k, v: block_causal_attention(q, k, v, mask, scale, block))(q, k, v)
    reference = loss(lambda q, k, v: reference_attention(q, k, v, mask, scale))(q, k, v)
    # the loss sums 7,200 products that cancel: float32 sums them exactly only to a few ulps of their magnitudes
    # (the order of the sum is XLA's, and differs between CPUs), the outputs and gradients are compared one by one
    magnitude = float(jnp.sum(jnp.abs(reference_attention(q, k, v, mask, scale) * weights)))
    assert abs(float(blocked[0]) - float(reference[0])) <= 8 * np.finfo(np.float32).eps * magnitude
    for got, want in zip(blocked[1], reference[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(block_causal_attention(q, k, v, mask, scale, block),
                               reference_attention(q, k, v, mask, scale), rtol=1e-5, atol=1e-6)


def test_rope_rotates_each_pair_of_halves_by_its_angle():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 100, (2, 5))
    inv_freq = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    angles = positions[..., None, None] * inv_freq  # (2, 5, 1, 4)
    first, second = x[..., :4], x[..., 4:]
    want = np.concatenate([first * np.cos(angles) - second * np.sin(angles),
                           second * np.cos(angles) + first * np.sin(angles)], axis=-1)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq), want, rtol=1e-5,
                               atol=1e-5)
