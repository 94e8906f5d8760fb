"""The Pallas LoRA kernels in interpret mode on the CPU equal the pure-jnp reference, and lower to Triton for CUDA.

Each case covers several properties at once (tokens 1..257, ranks 1..128, widths that are not multiples of
the tiles, block-diagonal factors, empty groups, every token on slot 0, one adapter for every token, float32
and bfloat16), and runs all four kernels: decode (BGMV) and prefill (SGMV) shrink and expand.

Tolerance: kernels and reference both accumulate in float32 (bfloat16 products are exact in float32) and
differ only in summation order, so |kernel - reference| <= 2·n·eps32·Σ|terms| for n accumulated terms, the
textbook bound for two orders of the same float32 sum; Σ|terms| is the reference applied to |inputs|.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdlora_jax.bench.lora_timing import ModuleShape, layer_inputs, local_shapes, methods, token_slots
from bdlora_jax.config import load_model_config_yaml
from bdlora_jax.configs import CONFIGS_DIR
from bdlora_jax.kernels import (
    TileConfig,
    bgmv_expand,
    bgmv_shrink,
    group_by_slot,
    heuristic_config,
    reference,
    sgmv_expand,
    sgmv_shrink,
    work_items,
)

EPS32 = float(np.finfo(np.float32).eps)
SMALL_TILES = TileConfig(block_m=16, block_n=16, block_k=16)  # several tiles and loop steps even at test sizes
STATIC = ("config", "interpret")
KERNELS = {name: jax.jit(fn, static_argnames=STATIC) for name, fn in (  # jitted so cases of one shape compile once
    ("bgmv_shrink", bgmv_shrink), ("sgmv_shrink", sgmv_shrink), ("bgmv_expand", bgmv_expand),
    ("sgmv_expand", sgmv_expand))}

SHAPES = {  # name: (tokens, blocks, d_in, rank, d_out, num_slots, dtype, config)
    "one_token_rank1": (1, 1, 40, 1, 24, 4, jnp.float32, None),
    "blocks_bf16": (7, 2, 24, 3, 20, 6, jnp.bfloat16, SMALL_TILES),
    "257_tokens_rank128": (257, 1, 72, 128, 40, 5, jnp.float32, SMALL_TILES),
    "narrow_blocks_rank16_bf16": (100, 4, 8, 16, 12, 3, jnp.bfloat16, None),
    "rank64_bank_of_9": (130, 1, 100, 64, 72, 9, jnp.float32, None),
}
CASES = {  # name: (shape, slots): "mixed" uses every slot but 3 (an empty group) and includes slot 0
    "one_token_one_adapter": ("one_token_rank1", "last"),
    "blocks_empty_groups": ("blocks_bf16", [0, 2, 2, 5, 1, 0, 2]),
    "257_tokens_mixed": ("257_tokens_rank128", "mixed"),
    "257_tokens_all_slot0": ("257_tokens_rank128", "zeros"),
    "257_tokens_one_adapter": ("257_tokens_rank128", "last"),
    "narrow_blocks_mixed": ("narrow_blocks_rank16_bf16", "mixed"),
    "narrow_blocks_all_slot0": ("narrow_blocks_rank16_bf16", "zeros"),
    "rank64_mixed": ("rank64_bank_of_9", "mixed"),
}


def _slots(spec, tokens: int, num_slots: int) -> np.ndarray:
    if spec == "zeros":
        return np.zeros(tokens, np.int32)
    if spec == "last":
        return np.full(tokens, num_slots - 1, np.int32)
    if spec == "mixed":
        choices = [s for s in range(num_slots) if s != 3]
        return np.random.default_rng(tokens).choice(choices, tokens).astype(np.int32)
    return np.asarray(spec, np.int32)


def _inputs(tokens, blocks, d_in, rank, d_out, num_slots, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, (num_slots, blocks, d_in, rank))
    b = rng.normal(0, 1, (num_slots, blocks, rank, d_out))
    a[0], b[0] = 0, 0
    x = rng.normal(0, 1, (tokens, blocks, d_in))
    h = rng.normal(0, 1, (tokens, blocks, rank))
    y = rng.normal(0, 1, (tokens, blocks, d_out)).astype(np.float32)
    return tuple(jnp.asarray(v, dtype) for v in (x, a, h, b)) + (jnp.asarray(y),)


def _assert_within(got, want, magnitude, terms: int, what: str):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = 2 * (terms + 1) * EPS32 * np.asarray(magnitude, np.float64)
    excess = np.abs(got - want) - bound
    assert excess.max() <= 0, f"{what}: |kernel - reference| exceeds the float32 bound by {excess.max():.3g}"


def _abs(v):
    return jnp.abs(v.astype(jnp.float32))


@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference(case):
    shape, spec = CASES[case]
    tokens, blocks, d_in, rank, d_out, num_slots, dtype, config = SHAPES[shape]
    x, a, h, b, y = _inputs(tokens, blocks, d_in, rank, d_out, num_slots, dtype)
    slots = jnp.asarray(_slots(spec, tokens, num_slots))
    order, sizes = group_by_slot(slots, num_slots)
    on_slot0 = np.asarray(slots) == 0
    run = {name: partial(fn, config=config, interpret=True) for name, fn in KERNELS.items()}

    want_h = reference.shrink(x, a, slots)
    h_scale = reference.shrink(_abs(x), _abs(a), slots)
    for name, got in (("bgmv_shrink", run["bgmv_shrink"](x, a, slots)),
                      ("sgmv_shrink", run["sgmv_shrink"](x, a, order, sizes))):
        assert got.dtype == jnp.float32 and got.shape == (tokens, blocks, rank)
        _assert_within(got, want_h, h_scale, d_in, name)
        assert not np.asarray(got)[on_slot0].any(), f"{name}: slot-0 rows must be exactly zero"

    want_y = reference.expand(h, b, slots, y)
    y_scale = jnp.abs(y) + reference.expand(_abs(h), _abs(b), slots, jnp.zeros_like(y))
    for name, got in (("bgmv_expand", run["bgmv_expand"](h, b, slots, y)),
                      ("sgmv_expand", run["sgmv_expand"](h, b, order, sizes, y))):
        assert got.dtype == jnp.float32 and got.shape == y.shape
        _assert_within(got, want_y, y_scale, rank + 1, name)
        np.testing.assert_array_equal(np.asarray(got)[on_slot0], np.asarray(y)[on_slot0])


def test_work_items_cover_every_sorted_position_once():
    block_m = 16
    tokens, num_slots = 300, 40
    items = jax.jit(work_items, static_argnums=(1, 2))
    for seed in range(3):  # about half the groups empty, the others of random sizes
        rng = np.random.default_rng(seed)
        weights = rng.random(num_slots) * rng.integers(0, 2, num_slots)
        sizes = rng.multinomial(tokens, weights / weights.sum())
        slot, start, end = (np.asarray(v) for v in items(jnp.asarray(sizes, jnp.int32), tokens, block_m))
        covered = np.zeros(tokens, np.int32)
        group_of = np.repeat(np.arange(num_slots), sizes)
        for s, lo, hi in zip(slot, start, end):
            rows = np.arange(lo, min(lo + block_m, hi))
            covered[rows] += 1
            assert (group_of[rows] == s).all()
        np.testing.assert_array_equal(covered, 1)


def test_heuristic_tiles_are_valid_triton_tiles_covering_the_rank():
    for op in ("shrink", "expand"):
        for mode in ("decode", "prefill"):
            for tokens, d_in, rank, d_out in ((1, 4096, 1, 512), (256, 4096, 128, 14336), (3, 8, 2, 12)):
                cfg = heuristic_config(op, mode, tokens, d_in, rank, d_out)
                assert all(v >= 16 and v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, cfg.block_k))
                rank_tile = cfg.block_n if op == "shrink" else cfg.block_k
                assert rank_tile >= min(rank, 64), "a program should cover up to 64 ranks in one tile"


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="block_k=24: expected a power of two >= 16"):
        TileConfig(block_m=16, block_n=16, block_k=24)
    x = jnp.zeros((4, 1, 32))
    with pytest.raises(ValueError, match=r"a has shape \(3, 1, 16, 8\); expected \(\*, 1, 32, \*\)"):
        bgmv_shrink(x, jnp.zeros((3, 1, 16, 8)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="y has dtype bfloat16; expected float32"):
        bgmv_expand(jnp.zeros((4, 1, 8)), jnp.zeros((3, 1, 8, 16)), jnp.zeros((4,), jnp.int32),
                    jnp.zeros((4, 1, 16), jnp.bfloat16))
    with pytest.raises(ValueError, match="mode='train'"):
        heuristic_config("shrink", "train", 1, 8, 8, 8)


# name: (tokens, d_in, rank, d_out, dtype): llama-3.1-8b per-device shapes at model axis 8, and r/N = 1
LOWER_SHAPES = {
    "decode_bf16_rank16": (16, 4096, 16, 512, jnp.bfloat16),
    "decode_f32_rank1": (16, 4096, 1, 1792, jnp.float32),
    "prefill_bf16_rank128": (2048, 1792, 128, 4096, jnp.bfloat16),
}


@pytest.mark.parametrize("shape", LOWER_SHAPES)
def test_kernels_lower_to_triton_for_cuda_without_a_gpu(shape):
    tokens, d_in, rank, d_out, dtype = LOWER_SHAPES[shape]
    x = jax.ShapeDtypeStruct((tokens, 1, d_in), dtype)
    a = jax.ShapeDtypeStruct((9, 1, d_in, rank), dtype)
    h = jax.ShapeDtypeStruct((tokens, 1, rank), dtype)
    b = jax.ShapeDtypeStruct((9, 1, rank, d_out), dtype)
    y = jax.ShapeDtypeStruct((tokens, 1, d_out), jnp.float32)
    index = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    sizes = jax.ShapeDtypeStruct((9,), jnp.int32)
    calls = {
        "lora_bgmv_shrink": (bgmv_shrink, (x, a, index)),
        "lora_bgmv_expand": (bgmv_expand, (h, b, index, y)),
        "lora_sgmv_shrink": (sgmv_shrink, (x, a, index, sizes)),
        "lora_sgmv_expand": (sgmv_expand, (h, b, index, sizes, y)),
    }
    for name, (fn, args) in calls.items():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1, name
        assert f'name = "{name}"' in text


@pytest.mark.parametrize("mode", ("decode", "prefill"))
def test_benchmark_alternatives_compute_the_same_lora(mode):
    shapes = [ModuleShape("block_diagonal", (2, 24, 3), (2, 3, 20))]
    slots = jnp.asarray(token_slots(mode, 37, 4))
    (inputs,) = layer_inputs(shapes, 37, 6, jnp.float32)
    want_h, want_y = jax.jit(methods(mode)["xla_gather"])(*inputs, slots)
    for name, fn in methods(mode, interpret=True).items():
        got_h, got_y = jax.jit(fn)(*inputs, slots)
        np.testing.assert_allclose(got_h, want_h, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5, err_msg=name)


def test_benchmark_times_the_per_device_shapes_of_each_strategy():
    config = load_model_config_yaml(CONFIGS_DIR / "models" / "llama-3.1-8b.yaml")
    q = {s: local_shapes(config, s, 8, 16)[0] for s in ("replicated", "slora", "bdlora")}
    assert q["replicated"].a == (1, 4096, 16) and q["replicated"].b == (1, 16, 512)
    assert q["slora"].a == (1, 4096, 2) and q["slora"].b == (1, 16, 512)
    assert q["bdlora"].a == (1, 4096, 2) and q["bdlora"].b == (1, 2, 512)
