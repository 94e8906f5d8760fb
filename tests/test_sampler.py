"""Per-row sampler: greedy rows are exact argmax, filters keep exactly the right tokens, seeds are batch-independent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import penalized_reference

from bdlora_jax.engine.sampler import SamplingParams, _top_p_count, row_keys, sample
from bdlora_jax.errors import InvalidRequestError

VOCAB = 64
ROWS = 32
DRAWS = 8192  # distribution tests share one (DRAWS, DRAW_VOCAB) shape so they share one compile
DRAW_VOCAB = 16
KEYS = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), DRAWS)))


def _run(logits, temperature, top_p, top_k, keys=None) -> np.ndarray:
    rows = np.shape(logits)[0]
    out = sample(
        np.asarray(logits, np.float32),
        np.broadcast_to(np.asarray(temperature, np.float32), (rows,)),
        np.broadcast_to(np.asarray(top_p, np.float32), (rows,)),
        np.broadcast_to(np.asarray(top_k, np.int32), (rows,)),
        KEYS[:rows] if keys is None else keys,
    )
    assert out.dtype == jnp.int32 and out.shape == (rows,)
    return np.asarray(out)


def _random_logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(ROWS, VOCAB)).astype(np.float32) * 3


def _draw_counts(logits_row, temperature=1.0, top_p=1.0, top_k=0) -> np.ndarray:
    """Counts per token of DRAWS draws from one distribution (padded with -inf to DRAW_VOCAB), a fixed key per draw."""
    padded = np.full(DRAW_VOCAB, -np.inf, np.float32)
    padded[: len(logits_row)] = logits_row
    tokens = _run(np.broadcast_to(padded, (DRAWS, DRAW_VOCAB)), temperature, top_p, top_k)
    return np.bincount(tokens, minlength=DRAW_VOCAB)[: len(logits_row)]


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    assert np.all(counts[probs == 0] == 0), "drew a token the filters removed"
    support = probs > 0
    return float(np.sum((counts[support] - expected[support]) ** 2 / expected[support]))


def test_greedy_rows_are_argmax_whatever_the_other_params():
    logits = _random_logits(seed=0)
    logits[3, [5, 9]] = logits[3].max() + 1  # a tie: argmax takes the lower index
    rng = np.random.default_rng(1)
    temperature = np.where(np.arange(ROWS) % 2 == 0, 0.0, rng.uniform(0.3, 3.0, ROWS))
    top_p = rng.choice([1e-6, 0.3, 0.9, 1.0], ROWS)
    top_k = rng.choice([0, 1, 5, VOCAB], ROWS)
    tokens = _run(logits, temperature, top_p, top_k)
    greedy = temperature == 0
    np.testing.assert_array_equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert np.any(tokens[~greedy] != logits.argmax(-1)[~greedy])


@pytest.mark.parametrize("temperature", [1e-30, 0.01, 0.5, 1.0, 5.0, 1e4])
def test_top_k_1_is_argmax_at_any_temperature(temperature):
    logits = _random_logits(seed=2)
    logits[0, [7, 2]] = logits[0].max() + 1
    tokens = _run(logits, temperature, 1.0, 1)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_tiny_top_p_is_argmax():
    logits = _random_logits(seed=3)
    tokens = _run(logits, 3.0, 1e-6, 0)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_top_k_draws_only_the_k_largest():
    logits_row = np.random.default_rng(4).normal(size=DRAW_VOCAB).astype(np.float32) * 0.3  # nearly flat
    counts = _draw_counts(logits_row, top_k=5)
    assert set(np.flatnonzero(counts)) == set(np.argsort(-logits_row)[:5])


def test_top_k_keeps_exactly_k_when_values_tie():
    counts = _draw_counts(np.array([3.0, 2.0, 2.0, 2.0, 1.0, 0.0], np.float32), top_k=2)
    assert set(np.flatnonzero(counts)) == {0, 1}


def test_top_p_draws_the_nucleus_in_proportion():
    probs = np.array([0.3, 0.15, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05], np.float32)
    counts = _draw_counts(np.log(probs), top_p=0.5)
    nucleus = np.array([0.3, 0.15, 0.1, 0, 0, 0, 0, 0, 0, 0]) / 0.55  # 0.3 + 0.15 + 0.1 first reaches 0.5
    assert _chi_square(counts, nucleus) < 13.8  # 2 degrees of freedom, p = 0.001


def test_temperature_then_top_k_then_top_p_in_proportion():
    logits_row = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5], np.float32)
    counts = _draw_counts(logits_row, temperature=2.0, top_p=0.7, top_k=6)
    probs = np.exp(logits_row[:6] / 2.0)
    probs /= probs.sum()
    keep = (np.cumsum(probs) - probs) < 0.7
    assert keep.sum() == 4
    expected = np.zeros(len(logits_row))
    expected[:6] = np.where(keep, probs, 0) / probs[keep].sum()
    assert _chi_square(counts, expected) < 16.3  # 3 degrees of freedom, p = 0.001


def test_no_filter_draws_the_softmax_in_proportion():
    logits_row = np.array([1.0, 0.5, 0.0, -0.5, -1.0, -4.0], np.float32)
    counts = _draw_counts(logits_row, temperature=0.5)
    probs = np.exp(logits_row / 0.5)
    assert _chi_square(counts, probs / probs.sum()) < 20.5  # 5 degrees of freedom, p = 0.001


def test_huge_logits_at_low_temperature_do_not_overflow():
    counts = _draw_counts(np.array([3e38, 3e38, 1e38], np.float32), temperature=0.5)
    assert _chi_square(counts, np.array([0.5, 0.5, 0.0])) < 10.8  # 1 degree of freedom, p = 0.001


def test_top_p_1_keeps_the_tail_the_running_sum_rounds_away():
    weights = jnp.exp(jnp.array([[0.0, -20.0, -30.0]]))  # in float32 the first weight alone rounds to the total
    np.testing.assert_array_equal(_top_p_count(weights, jnp.array([1.0])), [3])
    np.testing.assert_array_equal(_top_p_count(weights, jnp.array([0.999])), [1])


def test_top_p_keeps_the_prefix_whose_mass_reaches_top_p():
    weights = jnp.ones((1, 100))  # integer running sums: 90 of 100 reach 0.9 exactly
    np.testing.assert_array_equal(_top_p_count(weights, jnp.array([0.9])), [90])
    np.testing.assert_array_equal(_top_p_count(weights, jnp.array([0.905])), [91])


def test_one_compile_for_any_mix_of_rows():
    traces = []

    @jax.jit
    def step(*args):
        traces.append(1)
        return sample(*args)

    logits = _random_logits(seed=5)
    mixes = [(0.0, 1.0, 0), (1.0, 0.5, 3), (np.arange(ROWS) % 3 * 0.5, np.linspace(0.1, 1, ROWS), np.arange(ROWS))]
    for temperature, top_p, top_k in mixes:
        step(
            logits,
            np.broadcast_to(np.asarray(temperature, np.float32), (ROWS,)),
            np.broadcast_to(np.asarray(top_p, np.float32), (ROWS,)),
            np.broadcast_to(np.asarray(top_k, np.int32), (ROWS,)),
            KEYS[:ROWS],
        )
    assert len(traces) == 1


def test_row_keys_fold_the_step_into_the_seed():
    seeds = np.arange(ROWS, dtype=np.int32) % 2 + 7
    steps = np.arange(ROWS, dtype=np.int32) // 2
    keys = np.asarray(row_keys(seeds, steps))
    assert keys.shape == (ROWS, 2) and keys.dtype == np.uint32
    np.testing.assert_array_equal(keys[5], jax.random.key_data(jax.random.fold_in(jax.random.key(8), 2)))
    assert len({tuple(k) for k in keys}) == ROWS


def test_same_seed_and_step_give_the_same_token_in_any_batch():
    rng = np.random.default_rng(7)
    logits = _random_logits(seed=6)
    temperature, top_p, top_k = rng.uniform(0.5, 2, ROWS), rng.uniform(0.5, 1, ROWS), rng.integers(0, VOCAB, ROWS)
    seeds, steps = rng.integers(0, 2**31 - 1, ROWS, dtype=np.int32), rng.integers(0, 1000, ROWS, dtype=np.int32)
    batch = _run(logits, temperature, top_p, top_k, row_keys(seeds, steps))
    row = 17
    # the same request alone, then at row 0 of a batch of other requests
    one = slice(row, row + 1)
    alone = _run(logits[one], temperature[one], top_p[one], top_k[one], row_keys(seeds[one], steps[one]))
    moved = np.roll(np.arange(ROWS), -row)
    elsewhere = _run(
        logits[moved], temperature[moved], top_p[moved], top_k[moved], row_keys(seeds[moved], steps[moved])
    )
    assert batch[row] == alone[0] == elsewhere[0]
    np.testing.assert_array_equal(elsewhere, batch[moved])


def test_different_seeds_or_steps_draw_differently():
    flat = np.zeros((ROWS, VOCAB), np.float32)
    index, zero = np.arange(ROWS, dtype=np.int32), np.zeros(ROWS, np.int32)
    by_seed = _run(flat, 1.0, 1.0, 0, row_keys(index, zero))
    by_step = _run(flat, 1.0, 1.0, 0, row_keys(zero, index))
    assert len(set(by_seed)) > ROWS // 2 and len(set(by_step)) > ROWS // 2


def test_validate_accepts_the_defaults_and_the_edges():
    SamplingParams().validate(VOCAB)
    edges = SamplingParams(temperature=0.0, top_p=1.0, top_k=VOCAB, max_tokens=1_000_000, stop_token_ids=(0, VOCAB - 1))
    edges.validate(VOCAB)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.1, r"temperature must be >= 0, got -0.1"),
        ("temperature", float("nan"), r"temperature must be >= 0, got nan"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
        ("top_k", -1, r"top_k must be in \[0, 64\] \(0 = off\), got -1"),
        ("top_k", VOCAB + 1, r"top_k must be in \[0, 64\] \(0 = off\), got 65"),
        ("max_tokens", 0, r"max_tokens must be in \[1, 1000000\], got 0"),
        ("max_tokens", 1_000_001, r"max_tokens must be in \[1, 1000000\], got 1000001"),
        ("stop_token_ids", (3, -1), r"stop_token_ids must be in \[0, 64\), got \[-1\]"),
        ("stop_token_ids", (VOCAB,), r"stop_token_ids must be in \[0, 64\), got \[64\]"),
    ],
)
def test_validate_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value}).validate(VOCAB)


@pytest.mark.parametrize("seed", [-1, 2**31])
def test_seed_outside_int32_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2147483647\]"):
        SamplingParams(seed=seed).validate(64)


def test_top_candidates_equal_lax_top_k_with_ties():
    from bdlora_jax.engine.sampler import CANDIDATES, CHUNK, top_candidates

    rng = np.random.default_rng(3)
    smooth = rng.normal(size=(4, 50_000)).astype(np.float32)
    tied = rng.integers(0, 5, size=(4, 50_000)).astype(np.float32)  # thousands of ties at every value
    # the CANDIDATES largest one per chunk, so the last of them is the smallest chosen chunk maximum itself
    spread = rng.normal(size=(4, 50_000)).astype(np.float32)
    for row in spread:
        chunks = rng.choice(50_000 // CHUNK, CANDIDATES, replace=False)
        row[chunks * CHUNK + rng.integers(0, CHUNK, CANDIDATES)] = 10 + rng.permutation(CANDIDATES)
    for logits in (smooth, tied, spread):
        values, index = top_candidates(jnp.asarray(logits), CANDIDATES)
        want_values, want_index = jax.lax.top_k(jnp.asarray(logits), CANDIDATES)
        np.testing.assert_array_equal(values, want_values)
        np.testing.assert_array_equal(index, want_index)
        # a map applied to what is read, such as the sampler's shift and temperature, is top_k of the mapped logits
        shift, temperature = logits.max(axis=-1, keepdims=True), np.float32(0.7)
        monotone = jax.jit(lambda x, shift=shift, temperature=temperature: (x - shift) / temperature)
        values, index = top_candidates(jnp.asarray(logits), CANDIDATES, monotone)
        want_values, want_index = jax.lax.top_k(monotone(jnp.asarray(logits)), CANDIDATES)
        np.testing.assert_array_equal(values, want_values)
        np.testing.assert_array_equal(index, want_index)


def test_greedy_batch_on_a_large_vocabulary_is_argmax():
    logits = np.random.default_rng(4).normal(size=(ROWS, 32_000)).astype(np.float32)
    logits[3, [7, 900]] = 50.0  # a tie: the lower index wins, as with argmax
    np.testing.assert_array_equal(_run(logits, 0.0, 0.9, 50), np.argmax(logits, axis=-1))


def test_first_argmax_reads_the_vocabulary_once():
    from bdlora_jax.engine.sampler import first_argmax

    logits = np.random.default_rng(5).normal(size=(ROWS, 32_000)).astype(np.float32)
    logits[3, [7, 900]] = 50.0
    np.testing.assert_array_equal(np.asarray(first_argmax(logits)), np.argmax(logits, axis=-1))
    # one pass for the chunk maxima and a gather of one chunk a row; a pass for the row maxima would make it 3
    accessed = jax.jit(first_argmax).lower(logits).compile().cost_analysis()["bytes accessed"]
    assert accessed < 2.5 * logits.nbytes


def _large_vocab_case(seed: int):
    """Peaked rows over a 4096-token vocabulary, so top-k <= CANDIDATES and most top-p nuclei fit the candidates."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(ROWS, 4096)) * 4).astype(np.float32)
    top_k = np.where(np.arange(ROWS) % 2 == 0, rng.integers(1, 64, ROWS), 0).astype(np.int32)
    top_p = np.where(np.arange(ROWS) % 2 == 0, 1.0, rng.uniform(0.3, 0.95, ROWS)).astype(np.float32)
    return logits, rng.uniform(0.5, 1.5, ROWS).astype(np.float32), top_p, top_k


def test_candidate_draws_equal_the_sorted_draws_with_the_same_uniforms():
    from bdlora_jax.engine.sampler import CANDIDATES, _draw_candidates, _draw_sorted, top_candidates

    logits, temperature, top_p, top_k = _large_vocab_case(seed=8)
    scaled = (logits - logits.max(axis=-1, keepdims=True)) / temperature[:, None]
    u = np.random.default_rng(9).uniform(size=ROWS).astype(np.float32)
    values, index = top_candidates(jnp.asarray(scaled), CANDIDATES)
    by_candidates, fits = jax.jit(_draw_candidates)(values, index, jax.nn.logsumexp(scaled, axis=-1), top_k, top_p, u)
    by_sorting = jax.jit(_draw_sorted)(scaled, top_k, top_p, u)
    fits = np.asarray(fits)
    assert fits[top_k > 0].all() and fits.sum() > ROWS * 3 // 4
    np.testing.assert_array_equal(np.asarray(by_candidates)[fits], np.asarray(by_sorting)[fits])


def test_rows_the_candidates_cannot_hold_take_the_sorted_path():
    """Flat rows sort, one at a time; the peaked rows between them draw from their candidates as they do alone."""
    from bdlora_jax.engine.sampler import _draw_sorted

    logits = np.zeros((ROWS, 4096), np.float32)  # a top-p 0.9 nucleus of 3687 tokens, and top-k 1000
    peaked = np.arange(ROWS) % 4 == 3
    logits[peaked] = np.random.default_rng(10).normal(size=(peaked.sum(), 4096)) * 6
    temperature, top_p = np.ones(ROWS, np.float32), np.full(ROWS, 0.9, np.float32)
    top_k = np.where(np.arange(ROWS) % 4 == 0, 1000, 0).astype(np.int32)
    drawn = _run(logits, temperature, top_p, top_k)
    u = jax.vmap(lambda key: jax.random.uniform(key, ()))(jax.random.wrap_key_data(KEYS[:ROWS]))
    np.testing.assert_array_equal(drawn[~peaked], jax.jit(_draw_sorted)(logits, top_k, top_p, u)[~peaked])
    assert drawn[top_k == 1000].max() < 1000 and drawn[~peaked & (top_k == 0)].max() < 3687
    for row in np.flatnonzero(peaked):
        alone = _run(logits[row:row + 1], temperature[row], top_p[row], top_k[row], KEYS[row:row + 1])
        assert drawn[row] == alone[0]


def _sorted_draw_reference(scaled: np.ndarray, top_k, top_p, u, tolerance: float = 2e-6):
    """(token, ambiguous) per row in float64: the stable descending order, top-k, the prefix whose mass reaches top_p,
    then the first position whose running mass exceeds u of the kept total; ambiguous where a running sum lies within
    `tolerance` of the total from a boundary, so float32 rounding may fairly pick the neighbour."""
    tokens, ambiguous = [], []
    for row, k, p, draw in zip(scaled.astype(np.float64), top_k, top_p, u.astype(np.float64)):
        order = np.argsort(-row, kind="stable")
        weights = np.exp(row[order])
        weights[k or len(row):] = 0
        running = np.cumsum(weights)
        near = False
        if p < 1:
            kept = np.searchsorted(running, p * running[-1]) + 1
            near = np.min(np.abs(running[max(kept - 2, 0):kept] - p * running[-1])) < tolerance * running[-1]
            weights[kept:] = 0
            running = np.cumsum(weights)
        position = int(np.searchsorted(running, draw * running[-1], side="right"))
        near |= np.min(np.abs(running[max(position - 1, 0):position + 1] - draw * running[-1])) < tolerance * running[-1]
        tokens.append(order[position])
        ambiguous.append(near)
    return np.array(tokens), np.array(ambiguous)


@pytest.mark.parametrize("case", ["smooth", "tied", "masked", "uniform"])
def test_the_sorted_draw_equals_a_float64_stable_sort(case):
    """_draw_sorted sorts integer keys, not (value, index) pairs: its token is still the one at the drawn position of
    the stable descending order, under top-k, top-p and both."""
    from bdlora_jax.engine.sampler import _draw_sorted

    rng = np.random.default_rng(["smooth", "tied", "masked", "uniform"].index(case))
    rows, vocab = 48, 1000  # not a multiple of the chunk
    scaled = {"smooth": rng.normal(size=(rows, vocab)), "tied": rng.integers(-3, 1, size=(rows, vocab)) * 1.0,
              "masked": np.where(rng.uniform(size=(rows, vocab)) < 0.7, -np.inf, rng.normal(size=(rows, vocab))),
              "uniform": np.zeros((rows, vocab))}[case].astype(np.float32)
    scaled -= scaled.max(axis=-1, keepdims=True)
    top_k = rng.choice([0, 1, 7, 333, vocab], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.93713, 0.51329, 0.10317, 1e-6], rows).astype(np.float32)  # targets off the ties
    u = rng.uniform(size=rows).astype(np.float32)
    drawn = np.asarray(jax.jit(_draw_sorted)(scaled, top_k, top_p, u))
    want, ambiguous = _sorted_draw_reference(scaled, top_k, top_p, u)
    assert ambiguous.sum() <= rows // 10
    np.testing.assert_array_equal(drawn[~ambiguous], want[~ambiguous])


def test_a_batch_with_few_sampling_rows_draws_what_each_row_draws_alone():
    """At most half the rows sampling take the blocked draw (rows grouped by path, DRAW_ROWS at a time): each row,
    whatever its path and place, draws what it draws alone, with a row count that DRAW_ROWS does not divide."""
    from bdlora_jax.engine.sampler import CANDIDATES, DRAW_ROWS

    rows = 4 * DRAW_ROWS + 3
    rng = np.random.default_rng(11)
    logits = (rng.normal(size=(rows, 4096)) * 4).astype(np.float32)
    logits[-1] = 0.0  # flat: its top-p 0.9 nucleus is larger than the candidates, so it takes the sorted path
    temperature = np.zeros(rows, np.float32)  # greedy rows keep filters that would change a draw
    top_p, top_k = np.full(rows, 0.5, np.float32), np.full(rows, 3, np.int32)
    paths = {1: (0.8, 0), 4: (1.0, 0), 6: (0.9, 0), 9: (1.0, 20), 12: (1.0, 0), 15: (0.7, 2 * CANDIDATES),
             17: (1.0, 5), rows - 1: (0.9, 0)}
    for row, (p, k) in paths.items():
        temperature[row], top_p[row], top_k[row] = rng.uniform(0.5, 1.5), p, k
    assert 2 * len(paths) <= rows
    keys = row_keys(rng.integers(0, 2**31 - 1, rows, dtype=np.int32), rng.integers(0, 1000, rows, dtype=np.int32))
    batch = _run(logits, temperature, top_p, top_k, keys)
    alone = [_run(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], top_k[i:i + 1], keys[i:i + 1])[0]
             for i in range(rows)]
    np.testing.assert_array_equal(batch, alone)
    greedy = temperature == 0
    np.testing.assert_array_equal(batch[greedy], logits[greedy].argmax(axis=-1))


def test_unfiltered_draws_over_many_chunks_in_proportion():
    logits_row = np.full(1000, -np.inf, np.float32)
    logits_row[[5, 300, 640, 999]] = [0.0, 1.0, -1.0, 0.5]  # four tokens in four different chunks
    tokens = _run(np.broadcast_to(logits_row, (DRAWS, 1000)), 1.0, 1.0, 0)
    counts = np.bincount(tokens, minlength=1000)
    probs = np.exp(np.where(np.isfinite(logits_row), logits_row, -np.inf))
    assert _chi_square(counts, probs / probs.sum()) < 16.3  # 3 degrees of freedom, p = 0.001


# ---------------------------------------------------------------------------- logit adjustments and logprobs


def test_adjust_equals_the_numpy_reference_of_bias_and_penalties():
    from bdlora_jax.engine.penalties import adjust, prompt_mask

    rng = np.random.default_rng(11)
    rows, width = 6, 4
    logits = (rng.normal(size=(rows, VOCAB)) * 3).astype(np.float32)
    prompts = [list(rng.integers(0, VOCAB, rng.integers(1, 12))) for _ in range(rows)]
    outputs = [list(rng.integers(0, VOCAB // 4, rng.integers(0, 20))) for _ in range(rows)]  # repeats, surely
    biases = [dict(zip(rng.choice(VOCAB, width, replace=False).tolist(), rng.uniform(-100, 100, width).tolist()))
              for _ in range(rows)]
    penalties = np.array([rng.uniform(0.5, 2.0, rows), rng.uniform(-2, 2, rows), rng.uniform(-2, 2, rows)],
                         np.float32)
    penalties[:, 0] = (1.0, 0.0, 0.0)  # a neutral row stays exactly as it was, bias aside
    ids = np.array([list(b) for b in biases], np.int32)
    values = np.array([list(b.values()) for b in biases], np.float32)
    counts = np.stack([np.bincount(np.asarray(o, int), minlength=VOCAB) for o in outputs]).astype(np.int32)
    got = np.asarray(jax.jit(adjust)(logits, ids, values, prompt_mask(prompts, rows, VOCAB), counts, penalties))
    for i in range(rows):
        want = penalized_reference(logits[i], biases[i], prompts[i], outputs[i], *penalties[:, i])
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-4)
    unbiased = np.asarray(jax.jit(adjust)(logits, ids, np.zeros_like(values), prompt_mask(prompts, rows, VOCAB),
                                          counts, penalties))
    np.testing.assert_array_equal(unbiased[0], logits[0])
    assert np.abs(unbiased[1:] - logits[1:]).max() > 0.1


def test_token_logprobs_are_log_softmax_at_the_chosen_and_top_tokens():
    from bdlora_jax.engine.logprobs import token_logprobs

    logits = _random_logits(seed=12)
    tokens = np.random.default_rng(13).integers(0, VOCAB, ROWS).astype(np.int32)
    chosen, values, ids = (np.asarray(a) for a in jax.jit(token_logprobs, static_argnums=2)(logits, tokens, 5))
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen, logp[np.arange(ROWS), tokens], atol=1e-5)
    np.testing.assert_array_equal(ids, np.argsort(-logits, axis=-1, kind="stable")[:, :5])
    np.testing.assert_allclose(values, np.take_along_axis(logp, ids, axis=-1), atol=1e-5)


def test_validate_accepts_the_new_fields_at_their_edges():
    SamplingParams(logit_bias=((0, -100.0), (VOCAB - 1, 100.0)), presence_penalty=-2.0, frequency_penalty=2.0,
                   repetition_penalty=1e-3, logprobs=20, ignore_eos=True, min_tokens=16).validate(VOCAB)
    SamplingParams(logit_bias=tuple((t, 1.0) for t in range(300)), logprobs=0).validate(1000)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("logit_bias", ((VOCAB, 1.0),), r"logit_bias token ids must be in \[0, 64\), got \[64\]"),
        ("logit_bias", ((-1, 1.0),), r"logit_bias token ids must be in \[0, 64\), got \[-1\]"),
        ("logit_bias", ((3, 100.5),), r"logit_bias values must be in \[-100, 100\], got \[100.5\]"),
        ("logit_bias", ((3, float("nan")),), r"logit_bias values must be in \[-100, 100\], got \[nan\]"),
        ("logit_bias", ((3, 1.0), (3, 2.0)), r"logit_bias names a token id more than once"),
        ("logit_bias", tuple((t % VOCAB, 0.0) for t in range(301)), r"logit_bias may hold at most 300 tokens"),
        ("presence_penalty", 2.5, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ("frequency_penalty", -2.1, r"frequency_penalty must be in \[-2, 2\], got -2.1"),
        ("frequency_penalty", float("nan"), r"frequency_penalty must be in \[-2, 2\], got nan"),
        ("repetition_penalty", 0.0, r"repetition_penalty must be > 0 and finite, got 0.0"),
        ("repetition_penalty", float("inf"), r"repetition_penalty must be > 0 and finite, got inf"),
        ("logprobs", 21, r"logprobs must be in \[0, 20\], got 21"),
        ("logprobs", -1, r"logprobs must be in \[0, 20\], got -1"),
        ("min_tokens", 17, r"min_tokens must be in \[0, max_tokens=16\], got 17"),
        ("min_tokens", -1, r"min_tokens must be in \[0, max_tokens=16\], got -1"),
    ],
)
def test_validate_names_the_bad_new_field(field, value, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        SamplingParams(**{field: value}).validate(VOCAB)
    assert info.value.field == field
