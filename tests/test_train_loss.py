"""The chunked cross-entropy: the whole loss's values and gradients, with the LM head applied twice per token."""

import re

import jax
import numpy as np
import pytest

from bdlora_jax.train.loss import token_cross_entropy

ROWS, SEQ, WIDTH, VOCAB = 3, 7, 16, 50


def _inputs():
    """Hidden states, head, targets and per-token weights of a small ragged batch (21 tokens)."""
    k = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(k[0], (ROWS, SEQ, WIDTH)), jax.random.normal(k[1], (WIDTH, VOCAB)) * 0.3,
            jax.random.randint(k[2], (ROWS, SEQ), 0, VOCAB), jax.random.uniform(k[3], (ROWS, SEQ)))


def _weighted_loss(chunk_tokens):
    """The weighted loss sum of hidden and head, with chunk_tokens (0: whole)."""
    _, _, targets, weights = _inputs()
    return lambda hidden, head: (token_cross_entropy(hidden, head, targets, chunk_tokens) * weights).sum()


@pytest.mark.parametrize("chunk_tokens", [1, 4, 5, 21, 64])
def test_chunks_give_the_whole_losses_and_gradients_of_hidden_states_and_head(chunk_tokens):
    hidden, head, targets, _ = _inputs()
    np.testing.assert_allclose(token_cross_entropy(hidden, head, targets, chunk_tokens),
                               token_cross_entropy(hidden, head, targets), rtol=1e-6, atol=1e-6)
    got = jax.grad(_weighted_loss(chunk_tokens), argnums=(0, 1))(hidden, head)
    want = jax.grad(_weighted_loss(0), argnums=(0, 1))(hidden, head)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_chunked_losses_under_jit_without_gradients_equal_the_whole():
    hidden, head, targets, _ = _inputs()
    chunked = jax.jit(lambda h, w: token_cross_entropy(h, w, targets, 4))(hidden, head)
    np.testing.assert_allclose(chunked, token_cross_entropy(hidden, head, targets), rtol=1e-6, atol=1e-6)


def _products(compiled_text: str) -> int:
    """Dot instructions in compiled HLO (here every one is a product with the LM head)."""
    return len(re.findall(r"\bdot\(", compiled_text))


def test_the_hidden_states_gradient_applies_the_head_twice_as_the_whole_loss_does():
    hidden, head, _, _ = _inputs()
    for chunk_tokens in (0, 4):
        step = jax.jit(jax.value_and_grad(_weighted_loss(chunk_tokens)))
        assert _products(step.lower(hidden, head).compile().as_text()) == 2, chunk_tokens
