"""AdapterLayout.place: the adapter bank, the trainer's bank, the compressed bank and compression's block problems
all equal what their former per-site block mappings (kept below as private references) produced, for dense LoRA
and BD-LoRA of several block counts on every module kind, with rank padding, under every strategy; and jax.grad
flows through place.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdlora_jax.adapters.adapter import ModuleFactors
from bdlora_jax.adapters.bank import BankLayout, bank_key, slot_arrays
from bdlora_jax.adapters.compressed import CompressedLayout, host_arrays
from bdlora_jax.adapters.compressed_store import block_dims
from bdlora_jax.adapters.layout import AdapterLayout, block_diagonal, served_rank
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.compress.problems import build_problem
from bdlora_jax.compress.synthetic import random_compressed_bank
from bdlora_jax.config import COLUMN_MODULES, LORA_MODULES, ModelConfig
from bdlora_jax.train.factors import AdapterSpec, bank_rank, to_bank

CONFIG = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8, num_kv_heads=2,
                     head_dim=8, name="layout-test")
STRATEGIES = ("replicated", "slora", "bdlora")
BLOCKS = (1, 2, 4, 8)


def _served(strategy: str, nblocks: int, model_blocks: int) -> bool:
    """Whether the bank serves an adapter of nblocks on this model axis (bdlora needs whole blocks per device)."""
    return strategy != "bdlora" or nblocks == 1 or nblocks % model_blocks == 0


CASES = [(s, nb, n) for s in STRATEGIES for nb in BLOCKS for n in BLOCKS if _served(s, nb, n)]


# ------------------------------------------------------------------------------ former implementations (reference)


def _ref_shapes(module, max_rank, n, block_factors):
    d_in, d_out = CONFIG.module_dims(module)
    r = max_rank
    if module in COLUMN_MODULES:
        return (d_in, r), ((n, r // n, d_out // n) if block_factors else (r, d_out))
    return ((n, d_in // n, r // n) if block_factors else (d_in, r)), (r, d_out)


def _ref_slot(factors: ModuleFactors, scale, module, max_rank, n, block_factors):
    """The bank's former _dense_slot / _block_slot."""
    a_shape, b_shape = _ref_shapes(module, max_rank, n, block_factors)
    a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
    r = factors.rank
    dense_a, dense_b = factors.dense_a(), scale * factors.dense_b()
    if not block_factors:
        a[:, :r] = dense_a
        b[:r, :] = dense_b
        return a, b
    rb = max_rank // n
    column = module in COLUMN_MODULES
    blocks = factors.b_blocks if column else factors.a_blocks
    step = r // n if blocks > 1 else r
    d_in, d_out = CONFIG.module_dims(module)
    for i in range(n):
        rank_slice = slice(i * step, (i + 1) * step) if blocks > 1 else slice(0, r)
        if column:
            out_slice = slice(i * d_out // n, (i + 1) * d_out // n)
            a[:, i * rb:i * rb + step] = dense_a[:, rank_slice]
            b[i, :step, :] = dense_b[rank_slice, out_slice]
        else:
            in_slice = slice(i * d_in // n, (i + 1) * d_in // n)
            a[i, :, :step] = dense_a[in_slice, rank_slice]
            b[i * rb:i * rb + step, :] = dense_b[rank_slice, :]
    return a, b


def _ref_group_blocks(blocks, groups):
    k, nb, p, q = blocks.shape
    per = nb // groups
    grouped = blocks.reshape(k, groups, per, p, q)
    dense = jnp.einsum("kgipq,ij->kgipjq", grouped, jnp.eye(per, dtype=blocks.dtype))
    return dense.reshape(k, groups, per * p, per * q)


def _ref_dense(x):
    return x if x.ndim == 3 else _ref_group_blocks(x, 1)[:, 0]


def _ref_to_bank(factors, spec: AdapterSpec, layout: BankLayout):
    """The trainer's former to_bank."""
    n = layout.model_blocks
    bank = {}
    for layer, module in layout.module_keys():
        key = bank_key(layer, module)
        (a_shape, _), (b_shape, _) = layout.factor_shapes(module)
        if key not in factors:
            bank[key] = (jnp.zeros(a_shape, jnp.dtype(layout.dtype)), jnp.zeros(b_shape, jnp.dtype(layout.dtype)))
            continue
        a, b = factors[key]
        k = a.shape[0]
        if not layout.block_factors:
            a_bank, b_bank = _ref_dense(a), _ref_dense(b)
        elif module in COLUMN_MODULES:
            if b.ndim == 4:
                a_bank, b_bank = _ref_dense(a), _ref_group_blocks(b, n)
            else:
                d_out = b.shape[2]
                a_bank = jnp.tile(a, (1, 1, n))
                b_bank = b.reshape(k, spec.rank, n, d_out // n).transpose(0, 2, 1, 3)
        else:
            if a.ndim == 4:
                a_bank, b_bank = _ref_group_blocks(a, n), _ref_dense(b)
            else:
                d_in = a.shape[1]
                a_bank = a.reshape(k, n, d_in // n, spec.rank)
                b_bank = jnp.tile(b, (1, n, 1))
        dtype = jnp.dtype(layout.dtype)
        zeros_a, zeros_b = jnp.zeros((1,) + a_bank.shape[1:], dtype), jnp.zeros((1,) + b_bank.shape[1:], dtype)
        bank[key] = (jnp.concatenate([zeros_a, a_bank.astype(dtype)]),
                     jnp.concatenate([zeros_b, (spec.scale * b_bank).astype(dtype)]))
    return bank


def _ref_module_arrays(bank, key, layout: CompressedLayout):
    """The compressed bank's former _module_arrays."""
    module = key[1]
    (v_shape, _), (u_shape, _), (s_shape, _) = layout.shapes(module)
    v, u, sigma = (np.zeros(s, np.float32) for s in (v_shape, u_shape, s_shape))
    m = bank.modules[key]
    nb, rb, n, column = bank.blocks, bank.rank_per_block, layout.model_blocks, module in COLUMN_MODULES
    mu, mv, ms = m.u, m.v, m.sigma_matrices()
    d_in, d_out = layout.config.module_dims(module)
    if layout.block_factors and nb == 1 and n > 1:
        for i in range(n):
            if column:
                v[:, :, i * rb:(i + 1) * rb] = mv[:, 0]
                u[:, i] = mu[:, 0, i * d_out // n:(i + 1) * d_out // n].transpose(0, 2, 1)
            else:
                v[:, i] = mv[:, 0, i * d_in // n:(i + 1) * d_in // n]
                u[:, i * rb:(i + 1) * rb] = mu[:, 0].transpose(0, 2, 1)
            sigma[1:, i] = ms[:, 0]
        return v, u, sigma
    k = nb // n if layout.block_factors else nb
    d_in_b, d_out_b = (d_in, d_out // nb) if column else (d_in // nb, d_out)
    for j in range(nb):
        dev, m_ = divmod(j, k)
        rank = slice(j * rb, (j + 1) * rb)
        local = slice(m_ * rb, (m_ + 1) * rb)
        ut = mu[:, j].transpose(0, 2, 1)
        if column:
            v[:, :, rank] = mv[:, j]
            if layout.block_factors:
                u[:, dev, local, m_ * d_out_b:(m_ + 1) * d_out_b] = ut
            else:
                u[:, rank, j * d_out_b:(j + 1) * d_out_b] = ut
        else:
            if layout.block_factors:
                v[:, dev, m_ * d_in_b:(m_ + 1) * d_in_b, local] = mv[:, j]
            else:
                v[:, j * d_in_b:(j + 1) * d_in_b, rank] = mv[:, j]
            u[:, rank] = ut
        block, within = (dev, local) if layout.block_factors else (0, rank)
        sigma[1:, block, within, within] = ms[:, j]
    return v, u, sigma


def _ref_overlapping_ranks(rank, adapter_blocks, blocks, j):
    if adapter_blocks == 1:
        return np.arange(rank)
    step = rank // adapter_blocks
    keep = [q for q in range(adapter_blocks)
            if q * blocks < (j + 1) * adapter_blocks and (q + 1) * blocks > j * adapter_blocks]
    return np.concatenate([np.arange(q * step, (q + 1) * step) for q in keep])


def _ref_block_factors(factors: ModuleFactors, scale, module, blocks, j):
    """Compression's former block_factors (PEFT orientation)."""
    a, b = factors.dense_a().T, scale * factors.dense_b().T
    d_in, d_out = CONFIG.module_dims(module)
    if module in COLUMN_MODULES:
        ranks = _ref_overlapping_ranks(factors.rank, factors.b_blocks, blocks, j)
        rows = slice(j * d_out // blocks, (j + 1) * d_out // blocks)
        return a[ranks], b[rows][:, ranks]
    ranks = _ref_overlapping_ranks(factors.rank, factors.a_blocks, blocks, j)
    cols = slice(j * d_in // blocks, (j + 1) * d_in // blocks)
    return a[ranks][:, cols], b[:, ranks]


def _ref_problem(adapters, layer, module, blocks, j):
    """Compression's former build_problem."""
    d_in_b, d_out_b = block_dims(CONFIG, module, blocks)
    parts = []
    for adapter in adapters:
        factors = adapter.modules.get((layer, module))
        if factors is None:
            parts.append((np.zeros((0, d_in_b), np.float32), np.zeros((d_out_b, 0), np.float32)))
        else:
            parts.append(_ref_block_factors(factors, adapter.scale, module, blocks, j))
    rank = max(1, max(a.shape[0] for a, _ in parts))
    a = np.zeros((len(adapters), rank, d_in_b), np.float32)
    b = np.zeros((len(adapters), d_out_b, rank), np.float32)
    for i, (ai, bi) in enumerate(parts):
        a[i, :ai.shape[0]] = ai
        b[i, :, :bi.shape[1]] = bi
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.sqrt(np.maximum(np.einsum("nkl,nlk->n", np.einsum("nok,nol->nkl", b64, b64),
                                         np.einsum("nkd,nld->nkl", a64, a64)), 0.0))
    b /= np.where(norms > 0, norms, 1.0)[:, None, None]
    return a, b, norms.astype(np.float32)


# ---------------------------------------------------------------------------------------------- equality tests


@pytest.mark.parametrize("strategy,nblocks,model_blocks", CASES)
def test_bank_slot_equals_former_mapping(strategy, nblocks, model_blocks):
    rank = 8 if nblocks > 1 else 2
    adapter = random_adapter(CONFIG, "a", rank, nblocks=nblocks, seed=nblocks + model_blocks)
    block_factors = strategy == "bdlora"
    max_rank = served_rank(rank, nblocks, block_factors, model_blocks) + model_blocks  # padded past the need
    layout = BankLayout(CONFIG, 2, max_rank, model_blocks, block_factors)
    slot = slot_arrays(adapter, layout)
    for module in LORA_MODULES:
        want = _ref_slot(adapter.modules[(0, module)], adapter.scale, module, max_rank, model_blocks, block_factors)
        for got, expected in zip(slot[bank_key(0, module)], want):
            np.testing.assert_array_equal(got, expected, err_msg=f"{strategy} nb={nblocks} N={model_blocks} {module}")


def _random_factors(spec: AdapterSpec, count: int, seed: int) -> dict:
    """Random trainable factors shaped as the trainer holds them (B nonzero, unlike PEFT's initialisation)."""
    rng = np.random.default_rng(seed)
    out = {}
    for module in spec.target_modules:
        d_in, d_out = CONFIG.module_dims(module)
        a_blocks, b_blocks = spec.blocks(module)
        r = spec.rank
        a = (count, d_in, r) if a_blocks == 1 else (count, a_blocks, d_in // a_blocks, r // a_blocks)
        b = (count, r, d_out) if b_blocks == 1 else (count, b_blocks, r // b_blocks, d_out // b_blocks)
        out[bank_key(0, module)] = (jnp.asarray(rng.normal(size=a), jnp.float32),
                                    jnp.asarray(rng.normal(size=b), jnp.float32))
    return out


@pytest.mark.parametrize("strategy,nblocks,model_blocks", CASES)
def test_trainer_bank_equals_former_mapping(strategy, nblocks, model_blocks):
    spec = AdapterSpec(rank=8, alpha=16.0, target_modules=LORA_MODULES[:-1], nblocks=nblocks)
    block_factors = strategy == "bdlora"
    layout = BankLayout(CONFIG, 3, bank_rank(spec, model_blocks, block_factors), model_blocks, block_factors)
    factors = _random_factors(spec, 2, seed=nblocks * 10 + model_blocks)
    got, want = to_bank(factors, spec, layout), _ref_to_bank(factors, spec, layout)
    assert got.keys() == want.keys()
    for key in want:
        for g, w in zip(got[key], want[key]):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{strategy} {key}")


@pytest.mark.parametrize("strategy,nblocks,model_blocks", CASES)
def test_compressed_bank_equals_former_mapping(strategy, nblocks, model_blocks):
    bank = random_compressed_bank(CONFIG, 3, rank=2 * nblocks, clusters=2, blocks=nblocks, seed=nblocks)
    plan = SimpleNamespace(model_size=model_blocks, block_factors=strategy == "bdlora", strategy=strategy,
                           mesh=None)
    layout = CompressedLayout.for_bank(bank, CONFIG, plan, "bank")
    arrays = host_arrays(bank, layout)
    for key in bank.modules:
        for got, want in zip(arrays[bank_key(*key)], _ref_module_arrays(bank, key, layout)):
            np.testing.assert_array_equal(got, want, err_msg=f"{strategy} N={model_blocks} {key}")


@pytest.mark.parametrize("blocks", BLOCKS)
def test_block_problems_equal_former_mapping(blocks):
    adapters = [random_adapter(CONFIG, f"a{nb}", rank, nblocks=nb, seed=nb)
                for nb, rank in ((1, 2), (1, 4), (2, 8), (4, 8), (8, 8), (8, 16))]
    adapters.append(random_adapter(CONFIG, "partial", 4, modules=("q_proj", "o_proj"), seed=9))
    for module in LORA_MODULES:
        for j in range(blocks):
            problem = build_problem(adapters, 0, module, blocks, j, CONFIG)
            a, b, norms = _ref_problem(adapters, 0, module, blocks, j)
            np.testing.assert_array_equal(problem.a, a, err_msg=f"blocks={blocks} {module} j={j}")
            np.testing.assert_array_equal(problem.b, b, err_msg=f"blocks={blocks} {module} j={j}")
            np.testing.assert_array_equal(problem.norms, norms)


# ----------------------------------------------------------------------------------------- place, directly


def test_place_is_the_same_on_numpy_and_jax():
    adapter = random_adapter(CONFIG, "bd", 8, nblocks=4, seed=1)
    layout = AdapterLayout(CONFIG, True, 2, 12)
    for module in ("k_proj", "down_proj"):
        f = adapter.modules[(0, module)]
        host = layout.place(module, f.own_a(), f.own_b(), f.a_blocks, f.b_blocks)
        device = layout.place(module, jnp.asarray(f.own_a()), jnp.asarray(f.own_b()), f.a_blocks, f.b_blocks)
        assert all(isinstance(x, np.ndarray) for x in host) and all(isinstance(x, jax.Array) for x in device)
        for h, d in zip(host, device):
            np.testing.assert_array_equal(h, np.asarray(d))


def test_place_refuses_a_rank_that_does_not_fit_a_device_block():
    layout = AdapterLayout(CONFIG, True, 4, 8)
    with pytest.raises(ValueError, match="q_proj: device blocks need rank 4, the layout has 2 per block"):
        layout.place("q_proj", np.zeros((64, 4), np.float32), np.zeros((4, 64), np.float32))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("module", ("up_proj", "o_proj"))
@pytest.mark.parametrize("nblocks", (1, 4))
def test_grad_through_place_matches_finite_differences(strategy, module, nblocks):
    """A quadratic loss of the placed factors: its gradient against central differences along random directions."""
    d_in, d_out = CONFIG.module_dims(module)
    r, n = 8, 2
    layout = AdapterLayout(CONFIG, strategy == "bdlora", n, served_rank(r, nblocks, strategy == "bdlora", n) + n)
    a_blocks, b_blocks = (1, nblocks) if module in COLUMN_MODULES else (nblocks, 1)
    rng = np.random.default_rng(nblocks)

    def shape(dim_in, dim_out, blocks):
        return (3, dim_in, dim_out) if blocks == 1 else (3, blocks, dim_in // blocks, dim_out // blocks)

    a = jnp.asarray(rng.normal(size=shape(d_in, r, a_blocks)), jnp.float32)
    b = jnp.asarray(rng.normal(size=shape(r, d_out, b_blocks)), jnp.float32)
    placed_shapes = [x.shape for x in layout.place(module, a, b, a_blocks, b_blocks)]
    weights = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in placed_shapes]

    def loss(a, b):
        pa, pb = layout.place(module, a, b, a_blocks, b_blocks)
        return jnp.sum(weights[0] * pa ** 2) + jnp.sum(weights[1] * pb)

    grads = jax.grad(loss, argnums=(0, 1))(a, b)
    for _ in range(3):
        da = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
        db = jnp.asarray(rng.normal(size=b.shape), jnp.float32)
        eps = 1e-2
        numeric = (loss(a + eps * da, b + eps * db) - loss(a - eps * da, b - eps * db)) / (2 * eps)
        analytic = jnp.sum(grads[0] * da) + jnp.sum(grads[1] * db)
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("nblocks", (1, 4))
def test_grad_of_the_trainer_bank_counts_each_entry_it_serves(strategy, nblocks):
    """d sum(bank) / d factor: every entry of a block factor is served once; a dense factor under bdlora is
    served whole by every device block (A of column, B of row modules: N times), scale folded into B."""
    n, block_factors = 4, strategy == "bdlora"
    spec = AdapterSpec(rank=8, alpha=4.0, target_modules=("q_proj", "down_proj"), nblocks=nblocks)
    layout = BankLayout(CONFIG, 3, bank_rank(spec, n, block_factors) + n, n, block_factors)
    factors = _random_factors(spec, 2, seed=3)
    grads = jax.grad(lambda f: sum(jnp.sum(x) for pair in to_bank(f, spec, layout).values() for x in pair))(factors)
    copies = n if block_factors and nblocks == 1 else 1
    for module, repeated in (("q_proj", 0), ("down_proj", 1)):
        got = grads[bank_key(0, module)]
        want = [np.ones(got[0].shape), np.full(got[1].shape, spec.scale)]
        want[repeated] = want[repeated] * copies
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, err_msg=f"{strategy} {module}")


def test_block_diagonal_keeps_leading_axes():
    blocks = np.arange(2 * 3 * 2 * 1, dtype=np.float32).reshape(2, 3, 2, 1)
    dense = block_diagonal(blocks)
    assert dense.shape == (2, 6, 3)
    np.testing.assert_array_equal(dense[1, 2:4, 1], blocks[1, 1, :, 0])
    assert np.count_nonzero(dense[:, 2:4, [0, 2]]) == 0
