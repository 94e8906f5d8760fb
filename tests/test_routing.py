"""One routing step per forward: the tile layout holds every adapted token once and the group mask marks each token's
own group, the grouped adapter math (tiles or every group's products, and the block math of training batches,
gradients included) equals per-row math on every mesh and strategy, and a compiled forward groups its tokens once
(one sort for the tiles, none for the mask), not per module."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MESHES, ONE_LAYER_CONFIG, STRATEGIES
from jax.sharding import PartitionSpec

from bdlora_jax.adapters import routing as routing_module
from bdlora_jax.adapters.bank import BankLayout, bank_key, slot_arrays, write_slot, zeros_bank
from bdlora_jax.adapters.compressed import CompressedLayout
from bdlora_jax.adapters.linear import PARTIAL, SLICE, LinearSpecs, LoraLayout, adapted_linear
from bdlora_jax.adapters.operands import LoraOperand
from bdlora_jax.adapters.routing import dense_groups, route_shard, tile_count, tile_size
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.comm import DecodeShape, compile_decode_step
from bdlora_jax.config import ModelConfig
from bdlora_jax.kernels import prefill_block_m
from bdlora_jax.mesh import MODEL, make_mesh
from bdlora_jax.model.llama import AdapterBatch, forward, init_cache, init_model, route, slot_groups
from bdlora_jax.sharding import factor_axes, make_plan, weight_axes

RANK = 32
SLOTS = np.array([2, 0, 1, 3, 2, 1, 0, 3], np.int32)  # BD-LoRA (8 blocks), none, dense rank 4, dense rank 2
MODULES = ("q_proj", "k_proj", "o_proj", "down_proj")  # column, kv column (replicated on 1x8), row, MLP row


def _bank(plan):
    layout = BankLayout.for_plan(ONE_LAYER_CONFIG, plan, 3, RANK, "float32")
    bank = zeros_bank(layout, plan)
    adapters = (random_adapter(ONE_LAYER_CONFIG, "dense_r4", rank=4, seed=1),
                random_adapter(ONE_LAYER_CONFIG, "bd_nb8_r16", rank=RANK, nblocks=8, seed=2),
                random_adapter(ONE_LAYER_CONFIG, "dense_r2", rank=2, seed=3))
    for slot, adapter in enumerate(adapters, start=1):
        bank = write_slot(bank, slot, slot_arrays(adapter, layout))
    return bank


def _per_row(x, w, slots, a, b, specs: LinearSpecs, a_spec: PartitionSpec, b_spec: PartitionSpec):
    """The reference: each row multiplies its own copy of its slot's factors, under the same shard_map and
    collectives (the adapted linear before routing)."""
    layout = LoraLayout.from_specs(a_spec, b_spec, a.ndim, b.ndim)
    row_parallel = specs.base_output == PARTIAL
    into_slice = row_parallel and layout.output == SLICE
    n = specs.mesh.shape[MODEL]

    def local(x, w, slots, a, b):
        batch, seq = x.shape[:2]
        a_rows, b_rows = a[slots], b[slots]
        if layout.a_block:
            xb = x.reshape(batch, seq, a_rows.shape[1], a_rows.shape[2])
            h = jnp.einsum("bsnd,bndr->bsnr", xb, a_rows, preferred_element_type=jnp.float32).reshape(batch, seq, -1)
        else:
            h = jnp.einsum("bsd,bdr->bsr", x, a_rows, preferred_element_type=jnp.float32)
        if layout.gather_rank:
            h = jax.lax.all_gather(h, MODEL, axis=2, tiled=True)
        if layout.reduce_rank:
            h = jax.lax.psum(h, MODEL)
        if layout.b_block:
            hb = h.reshape(batch, seq, b_rows.shape[1], b_rows.shape[2])
            delta = jnp.einsum("bsnr,bnro->bsno", hb, b_rows, preferred_element_type=jnp.float32)
            delta = delta.reshape(batch, seq, -1)
        else:
            delta = jnp.einsum("bsr,bro->bso", h, b_rows, preferred_element_type=jnp.float32)
        if into_slice:
            width = delta.shape[-1]
            buffer = jnp.zeros(delta.shape[:-1] + (n * width,), delta.dtype)
            delta = jax.lax.dynamic_update_slice_in_dim(buffer, delta, jax.lax.axis_index(MODEL) * width, axis=2)
        y = (jnp.dot(x, w, preferred_element_type=jnp.float32) + delta).astype(x.dtype)
        return jax.lax.psum(y, MODEL) if row_parallel else y

    return jax.shard_map(local, mesh=specs.mesh, in_specs=(specs.x, specs.w, specs.rows, a_spec, b_spec),
                         out_specs=specs.out)(x, w, slots, a, b)


def _grouped(x, w, slots, a, b, specs, a_spec, b_spec, bank, plan, groups):
    routing = route(AdapterBatch(bank, slots, groups=groups), x.shape[1], plan, kernels=False)
    return adapted_linear(x, w, specs, [LoraOperand(a, b, a_spec, b_spec)], routing)


def _module_operands(plan, bank, module):
    """(LinearSpecs, A spec, B spec, A, B) of one module of layer 0 under the plan."""
    w_axes = weight_axes(module)
    specs = LinearSpecs(plan.mesh, plan.spec(("batch", "seq", w_axes[0])), plan.spec(w_axes),
                        plan.spec(("batch", "seq", w_axes[1])), plan.spec(("batch",)))
    a_spec, b_spec = (plan.spec(axes) for axes in factor_axes(module, plan.block_factors))
    return (specs, a_spec, b_spec, *bank[bank_key(0, module)])


@pytest.mark.parametrize("products", ["tiles", "every group"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_grouped_math_equals_per_row_math(mesh, strategy, products, monkeypatch):
    monkeypatch.setattr(routing_module, "DENSE_PRODUCTS", 0 if products == "tiles" else 10**9)
    plan = make_plan(make_mesh(mesh), strategy, ONE_LAYER_CONFIG, RANK)
    bank = _bank(plan)
    slots = jnp.asarray(SLOTS)
    rng = np.random.default_rng(0)
    for seq, groups in ((1, jnp.asarray(slot_groups(SLOTS, 4))), (5, None)):  # host-known groups; every slot
        for module in MODULES:
            d_in, d_out = ONE_LAYER_CONFIG.module_dims(module)
            specs, a_spec, b_spec, a, b = _module_operands(plan, bank, module)
            x = jnp.asarray(rng.normal(size=(len(SLOTS), seq, d_in)), jnp.float32)
            w = jnp.asarray(rng.normal(size=(d_in, d_out)) * d_in ** -0.5, jnp.float32)
            want = jax.jit(partial(_per_row, specs=specs, a_spec=a_spec, b_spec=b_spec))(x, w, slots, a, b)
            grouped = partial(_grouped, specs=specs, a_spec=a_spec, b_spec=b_spec, plan=plan)
            routing = jax.jit(partial(route, seq=seq, plan=plan, kernels=False))(AdapterBatch(bank, slots, groups=groups))
            assert (routing.group_slots is None) == (products == "tiles")
            got = jax.jit(grouped)(x, w, slots, a, b, bank=bank, groups=groups)
            np.testing.assert_allclose(got, want, atol=2e-6, rtol=0, err_msg=f"{module}, seq {seq}")
            base = np.asarray(jnp.einsum("bsd,do->bso", x, w))
            adapted = SLOTS != 0
            assert np.abs(np.asarray(got) - base)[adapted].max() > 1e-2  # the adapters matter
            np.testing.assert_allclose(np.asarray(got)[~adapted], base[~adapted], atol=2e-6, rtol=0)


BLOCK_SLOTS = np.array([2, 2, 0, 0, 1, 1, 3, 3], np.int32)  # blocks of 2 rows: BD-LoRA, none, dense r4, dense r2


def _blocks(x, w, slots, a, b, specs, a_spec, b_spec, bank, plan):
    routing = route(AdapterBatch(bank, slots, row_block=2), x.shape[1], plan, kernels=False)
    return adapted_linear(x, w, specs, [LoraOperand(a, b, a_spec, b_spec)], routing)


def _value_and_grads(linear, x, w, slots, a, b, cotangent):
    """((<linear's output, cotangent>, output), its gradients in x, A and B)."""
    def loss(x, a, b):
        out = linear(x, w, slots, a, b)
        return jnp.sum(out * cotangent), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, a, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_block_math_and_its_gradients_equal_per_row_math(mesh, strategy):
    plan = make_plan(make_mesh(mesh), strategy, ONE_LAYER_CONFIG, RANK)
    bank = _bank(plan)
    slots = jnp.asarray(BLOCK_SLOTS)
    rng = np.random.default_rng(1)
    for module in MODULES[:3]:  # a column, a kv column and a row module (down_proj's layout is o_proj's)
        d_in, d_out = ONE_LAYER_CONFIG.module_dims(module)
        specs, a_spec, b_spec, a, b = _module_operands(plan, bank, module)
        x = jnp.asarray(rng.normal(size=(len(BLOCK_SLOTS), 3, d_in)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(d_in, d_out)) * d_in ** -0.5, jnp.float32)
        cotangent = jnp.asarray(rng.normal(size=(len(BLOCK_SLOTS), 3, d_out)), jnp.float32)
        inputs = (x, w, slots, a, b, cotangent)
        (_, want), want_grads = _value_and_grads(partial(_per_row, specs=specs, a_spec=a_spec, b_spec=b_spec),
                                                 *inputs)
        (_, got), got_grads = _value_and_grads(partial(_blocks, specs=specs, a_spec=a_spec, b_spec=b_spec,
                                                       bank=bank, plan=plan), *inputs)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0, err_msg=module)
        for name, g, h in zip(("x", "A", "B"), got_grads, want_grads):
            np.testing.assert_allclose(g, h, atol=2e-5, rtol=1e-5, err_msg=f"{module} d{name}")
        assert np.abs(np.asarray(got_grads[2])).max() > 1e-2  # B gets a gradient
        base = np.asarray(jnp.einsum("bsd,do->bso", x, w))
        assert np.abs(np.asarray(got) - base)[BLOCK_SLOTS != 0].max() > 1e-2


def _grouped_value_and_grads(plan, bank, slots, module, seed):
    """(per-row, grouped) (value, output), gradients in x, A and B of one module on rows of 3 tokens."""
    rng = np.random.default_rng(seed)
    d_in, d_out = ONE_LAYER_CONFIG.module_dims(module)
    specs, a_spec, b_spec, a, b = _module_operands(plan, bank, module)
    x = jnp.asarray(rng.normal(size=(len(slots), 3, d_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)) * d_in ** -0.5, jnp.float32)
    inputs = (x, w, slots, a, b, jnp.asarray(rng.normal(size=(len(slots), 3, d_out)), jnp.float32))
    groups = jnp.asarray(slot_groups(np.asarray(slots), 4))
    grouped = partial(_grouped, specs=specs, a_spec=a_spec, b_spec=b_spec, bank=bank, plan=plan, groups=groups)
    return (_value_and_grads(partial(_per_row, specs=specs, a_spec=a_spec, b_spec=b_spec), *inputs),
            _value_and_grads(grouped, *inputs))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", [MESHES[0], MESHES[-1]])
def test_every_group_products_and_their_gradients_equal_per_row_math(mesh, strategy):
    plan = make_plan(make_mesh(mesh), strategy, ONE_LAYER_CONFIG, RANK)
    bank = _bank(plan)
    assert dense_groups(len(SLOTS) * 3, 4)  # 24 tokens over 4 groups take the every-group products
    for module in MODULES[:3]:
        ((_, want), want_grads), ((_, got), got_grads) = _grouped_value_and_grads(plan, bank, jnp.asarray(SLOTS),
                                                                                  module, seed=2)
        # the expand sums over groups x rank, zeros included, so its float32 rounding may differ by a few ulps
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6, err_msg=module)
        for name, g, h in zip(("x", "A", "B"), got_grads, want_grads):
            np.testing.assert_allclose(g, h, atol=2e-5, rtol=1e-5, err_msg=f"{module} d{name}")
        assert np.abs(np.asarray(got_grads[2])).max() > 1e-2  # B gets a gradient


def test_every_group_routing_masks_each_token_to_its_own_group():
    slots = np.array([5, 0, 9, 5, 2, 0, 9, 9], np.int32)
    groups = jnp.asarray(slot_groups(slots, 4))  # [2, 5, 9, 0]
    routing = jax.jit(partial(route_shard, seq=2, kernels=False, dense=True))(jnp.asarray(slots), groups=groups)
    assert routing.tile_slots is None and routing.order is None
    np.testing.assert_array_equal(routing.group_slots, [2, 5, 9, 0])
    token_slots = np.repeat(slots, 2)
    want = (token_slots[:, None] == np.array([2, 5, 9, 0])[None, :]) & (token_slots[:, None] > 0)
    np.testing.assert_array_equal(routing.token_groups, want.astype(np.float32))
    # a decode step of 32 rows over up to 8 adapters takes the products; over 16, or a prefill, the tiles
    assert dense_groups(32, 8) and not dense_groups(32, 16) and not dense_groups(32 * 32, 1)


@pytest.mark.parametrize("tokens,groups", [(32, 32), (32, 4), (32, 1), (40, 3), (7, 16), (1024, 8)])
def test_tiles_hold_every_adapted_token_once_with_one_slot_per_tile(tokens, groups):
    rng = np.random.default_rng(tokens + groups)
    used = np.sort(rng.choice(np.arange(1, 50), size=groups, replace=False)).astype(np.int32)
    slots = np.where(rng.random(tokens) < 0.2, 0, rng.choice(used, size=tokens)).astype(np.int32)
    routing = jax.jit(partial(route_shard, seq=1, kernels=True))(jnp.asarray(slots), groups=jnp.asarray(used))
    tile = tile_size(tokens, groups)
    assert routing.tile == tile and routing.tile_slots.shape == (tile_count(tokens, groups, tile),)
    tile_tokens = np.asarray(routing.tile_tokens).reshape(-1, tile)
    seen = np.zeros(tokens, np.int32)
    for slot, members in zip(np.asarray(routing.tile_slots), tile_tokens):
        members = members[members < tokens]
        seen[members] += 1
        assert (slots[members] == slot).all() and (slot != 0 or len(members) == 0)
    np.testing.assert_array_equal(seen, slots != 0)  # each adapted token exactly once, the others nowhere
    places = np.asarray(routing.token_places)
    flat = np.asarray(routing.tile_tokens)
    for t in np.flatnonzero(slots):
        assert flat[places[t]] == t
    assert (places[slots == 0] == flat.shape[0]).all()
    slot, start, end = (np.asarray(v) for v in routing.work)  # the kernels' work items cover every token once
    covered = np.zeros(tokens, np.int32)
    order = np.asarray(routing.order)
    for s, lo, hi in zip(slot, start, end):
        members = order[lo:min(lo + prefill_block_m(tokens), hi)]
        covered[members] += 1
        assert (slots[members] == s).all()
    np.testing.assert_array_equal(covered, 1)


THREE_LAYERS = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=8,
                           num_kv_heads=4, head_dim=8)


def _sorts(hlo: str) -> int:
    return hlo.count(" sort(")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_compiled_decode_step_groups_tokens_once(strategy, monkeypatch):
    plan = make_plan(make_mesh("1x8"), strategy, THREE_LAYERS, RANK)
    shape = DecodeShape(batch=8, max_seq_len=32, max_loras=4, rank=RANK, dtype="float32")
    assert _sorts(compile_decode_step(THREE_LAYERS, plan, shape, with_lora=False).as_text()) == 0
    # 8 tokens over 4 groups multiply every group's factors: a mask, no sort
    assert _sorts(compile_decode_step(THREE_LAYERS, plan, shape, with_lora=True).as_text()) == 0
    monkeypatch.setattr(routing_module, "DENSE_PRODUCTS", 0)  # the tiles: one sort, shared by every module
    assert _sorts(compile_decode_step(THREE_LAYERS, plan, shape, with_lora=True).as_text()) == 1
    compressed = CompressedLayout(THREE_LAYERS, clusters=2, adapters=3, rank=RANK, model_blocks=8,
                                  block_factors=plan.block_factors,
                                  modules=tuple((layer, m) for layer in range(3) for m in ("q_proj", "down_proj")))
    assert _sorts(compile_decode_step(THREE_LAYERS, plan, shape, with_lora=True, compressed=compressed).as_text()) == 1


def test_a_compiled_pallas_interpret_prefill_groups_tokens_once():
    plan = make_plan(make_mesh("1x8"), "bdlora", THREE_LAYERS, RANK)
    graphdef, state = init_model(THREE_LAYERS, plan, jnp.float32, lora_impl="pallas_interpret")
    bank = zeros_bank(BankLayout.for_plan(THREE_LAYERS, plan, 4, RANK, "float32"), plan)
    tokens = jnp.zeros((8, 16), jnp.int32)
    start = jnp.zeros((8,), jnp.int32)
    cache = init_cache(THREE_LAYERS, plan, 8, 16)
    step = jax.jit(partial(forward, graphdef))
    hlo = step.lower(state, tokens, start, cache, AdapterBatch(bank, jnp.zeros((8,), jnp.int32))).compile().as_text()
    assert _sorts(hlo) == 1
