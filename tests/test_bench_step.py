"""`bench step`'s sampler arms: each runs the sampler on its own rows of the model's vocabulary."""

from types import SimpleNamespace

import numpy as np

from bdlora_jax.bench.step import _sampler_arms, nucleus_size


def test_every_sampler_arm_draws_one_token_per_row():
    engine = SimpleNamespace(model_config=SimpleNamespace(vocab_size=300))
    arms = _sampler_arms(engine, 8)
    assert list(arms) == ["sampler greedy", "sampler top-p/top-k mix", "sampler mix, flat logits",
                          "sampler, 1/4 rows top-p"]
    for call in arms.values():
        tokens = np.asarray(call())
        assert tokens.shape == (8,) and tokens.min() >= 0 and tokens.max() < 300


def test_nucleus_size_counts_the_tokens_top_p_keeps():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    assert nucleus_size(logits, 0.7) == (2 + 3) / 2
