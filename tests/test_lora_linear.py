"""The multi-adapter linear with the Pallas kernels: the whole model gives the XLA path's logits on every strategy
(interpret mode on the CPU), its decode step lowers to Triton kernels for CUDA, and lora_impl values resolve.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ONE_LAYER_CONFIG as CONFIG
from helpers import STRATEGIES
from jax.sharding import PartitionSpec

from bdlora_jax.adapters.bank import BankLayout, slot_arrays, write_slot, zeros_bank
from bdlora_jax.adapters.linear import resolve_lora_impl
from bdlora_jax.adapters.operands import LoraOperand
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.bench.triton_lowering import lower_decode_step, triton_kernels
from bdlora_jax.comm import DecodeShape
from bdlora_jax.mesh import make_mesh
from bdlora_jax.model.llama import (
    AdapterBatch,
    abstract_model,
    forward,
    init_cache,
    init_model,
)
from bdlora_jax.sharding import make_plan

# CONFIG: one layer whose 4 kv heads fall back to replicated on 1x8. Rank 8 on 1x8 leaves one rank per device.
RANK = 8
ROW_SLOTS = [2, 0, 1, 2]  # BD-LoRA, no adapter, dense LoRA; slot 3 stays empty (an empty group)
PROMPT = 5


def _runner(graphdef, state, plan):
    """(bank, row slots) -> prefill logits (grouped SGMV path) and the next decode step's logits (BGMV path)."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (len(ROW_SLOTS), PROMPT)), jnp.int32)
    start = jnp.zeros((len(ROW_SLOTS),), jnp.int32)

    @jax.jit
    def prefill_then_decode(cache, adapters):
        prefill, cache = forward(graphdef, state, tokens, start, cache, adapters)
        decode, _ = forward(graphdef, state, tokens[:, -1:], start + PROMPT, cache, adapters)
        return prefill, decode

    def run(bank, row_slots):
        slots = jax.device_put(jnp.asarray(row_slots, jnp.int32), plan.sharding(("batch",)))
        cache = init_cache(CONFIG, plan, len(ROW_SLOTS), PROMPT + 1)
        return [np.asarray(v) for v in prefill_then_decode(cache, AdapterBatch(bank, slots))]

    return run


@pytest.mark.slow  # the Pallas kernels in interpret mode: about 30 s per case on a 2-core CPU
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", ("1x1", "1x8"))
def test_pallas_model_gives_the_xla_logits(mesh, strategy):
    plan = make_plan(make_mesh(mesh), strategy, CONFIG, RANK)
    graphdef, state = init_model(CONFIG, plan, jnp.float32)
    pallas_graphdef, _ = abstract_model(CONFIG, plan, jnp.float32, lora_impl="pallas_interpret")
    layout = BankLayout.for_plan(CONFIG, plan, 3, RANK, "float32")
    bank = zeros_bank(layout, plan)
    for slot, adapter in ((1, random_adapter(CONFIG, "dense_r1", rank=1, seed=1)),
                          (2, random_adapter(CONFIG, "bd_nb8_r8", rank=RANK, nblocks=8, seed=2))):
        bank = write_slot(bank, slot, slot_arrays(adapter, layout))
    xla = _runner(graphdef, state, plan)
    want = xla(bank, ROW_SLOTS)
    got = _runner(pallas_graphdef, state, plan)(bank, ROW_SLOTS)
    for step, g, w in zip(("prefill", "decode"), got, want):
        # Both paths accumulate in float32 and differ only in summation order (observed ~1e-6 on logits ~4).
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=step)
    base = xla(bank, [0] * len(ROW_SLOTS))
    adapted = np.asarray(ROW_SLOTS) != 0
    for w, b in zip(want, base):  # the adapters matter, so the comparison above is not vacuous
        assert np.abs(w[adapted] - b[adapted]).min(axis=-1).max() > 1e-3
        np.testing.assert_array_equal(w[~adapted], b[~adapted])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decode_step_lowers_to_triton_kernels_for_cuda(strategy):
    plan = make_plan(make_mesh("1x8"), strategy, CONFIG, RANK)
    text = lower_decode_step(CONFIG, plan, DecodeShape(batch=4, max_seq_len=16, max_loras=3, rank=RANK,
                                                       dtype="bfloat16"), lora_impl="pallas", platform="cuda")
    kernels = triton_kernels(text)
    modules = 7 * CONFIG.num_layers
    assert {name: k["count"] for name, k in kernels.items()} == {"lora_bgmv_expand": modules,
                                                                 "lora_bgmv_shrink": modules}


def test_lora_impl_resolves_per_platform():
    assert resolve_lora_impl("auto", "gpu") == "pallas" and resolve_lora_impl("auto", "cpu") == "xla"
    assert resolve_lora_impl("pallas", "gpu") == "pallas" and resolve_lora_impl("pallas", "cpu") == "pallas_interpret"
    assert resolve_lora_impl("xla", "gpu") == "xla"
    with pytest.raises(ValueError, match="lora_impl='triton'"):
        resolve_lora_impl("triton", "gpu")


def test_unknown_lora_impl_is_rejected():
    spec = PartitionSpec()
    with pytest.raises(ValueError, match="impl='triton'"):
        LoraOperand(jnp.zeros((2, 8, 4)), jnp.zeros((2, 4, 8)), spec, spec, lora_impl="triton")
