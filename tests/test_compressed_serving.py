"""Compressed banks served by the model, the Engine and the server: the logits of the reconstructed adapters.

Reference: each compressed adapter replaced by `bank.reconstruct(name)` (U·Σ_i·Vᵀ as an ordinary LoRA / BD-LoRA)
written into a bank slot. To keep the strategy × mesh matrix to one small compile per case, one forward holds
both: row pairs with the same tokens, one row served compressed and one from the reconstruction's slot, beside
a row without adapter and one with an uncompressed adapter. The one-layer model's modules are split between a
dense bank (JD-Full, 2 clusters) and a block bank (JD-Diag, 8 blocks, 2 clusters), each with a column, a k/v
and a row module, so one forward serves both banks' arrays (their adapters share clusters and Σ ids).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MESHES, STRATEGIES

from bdlora_jax import Engine
from bdlora_jax.adapters.bank import BankLayout, slot_arrays
from bdlora_jax.adapters.compressed import CompressedLayout, CompressedServing
from bdlora_jax.adapters.compressed_store import MANIFEST_FILE, CompressedBankError
from bdlora_jax.adapters.peft_io import write_adapter
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.checkpoint import load_model_config
from bdlora_jax.comm import DecodeShape, compile_decode_step, count_collectives
from bdlora_jax.compress.synthetic import random_compressed_bank
from bdlora_jax.config import ModelConfig, load_model_config_yaml
from bdlora_jax.configs import CONFIGS_DIR
from bdlora_jax.engine.scheduler import Scheduler
from bdlora_jax.mesh import make_mesh
from bdlora_jax.model.llama import AdapterBatch, abstract_model, forward, init_model, param_shardings
from bdlora_jax.serve import create_app
from bdlora_jax.sharding import make_plan

# One layer with 4 kv heads (replicated on 1x8, so bdlora's k/v factors keep all 8 blocks on every device).
CONFIG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8,
                     num_kv_heads=4, head_dim=8)
DENSE = random_compressed_bank(CONFIG, 3, rank=4, clusters=2, method="full", seed=1,
                               modules=("q_proj", "k_proj", "o_proj", "up_proj"))
BLOCK = random_compressed_bank(CONFIG, 3, rank=16, clusters=2, blocks=8, method="diag", seed=2,
                               modules=("v_proj", "gate_proj", "down_proj"))
NAMES = DENSE.names  # compressed-0 .. 2 in both banks, clusters 0, 1, 0
PLAIN = random_adapter(CONFIG, "plain", rank=2, seed=3)
# (adapter, served compressed): no adapter, an uncompressed adapter, and each compressed adapter both ways
ROWS = [(None, False), ("plain", False)] + [(name, c) for name in NAMES for c in (True, False)]
MAX_RANK = 32  # the reconstructed dense rank-4 modules under bdlora on 1x8 need 4·8
PROMPT = 5
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # 15 compiles of a tiny model: compile time is what counts


def _reconstructed(name: str):
    """The uncompressed reference of a compressed adapter: both banks' reconstructions, module by module."""
    dense, block = DENSE.reconstruct(name), BLOCK.reconstruct(name)
    return dataclasses.replace(block, modules={**dense.modules, **block.modules}, nblocks=1, bd_a_modules=(),
                               bd_b_modules=())


@pytest.fixture(scope="module")
def host_params():
    """The model weights, made once and placed again on every mesh."""
    plan = make_plan(make_mesh("1x1"), "replicated", CONFIG)
    return jax.device_get(init_model(CONFIG, plan, jnp.float32, seed=0)[1])


def _place_bank(adapters: list, plan) -> dict:
    """An adapter bank with slots 1.. holding `adapters` (slot 0 empty), built on the host, placed in its shardings."""
    layout = BankLayout.for_plan(CONFIG, plan, len(adapters), MAX_RANK, "float32")
    slots = [slot_arrays(a, layout) for a in adapters]
    bank = {}
    for key in slots[0]:
        module = key.partition(".")[2]
        pair = []
        for factor, (_, axes) in enumerate(layout.factor_shapes(module)):
            stacked = np.stack([np.zeros_like(slots[0][key][factor])] + [s[key][factor] for s in slots])
            pair.append(jax.device_put(stacked, plan.sharding(axes)))
        bank[key] = tuple(pair)
    return bank


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_compressed_rows_give_the_reconstructed_rows(host_params, mesh, strategy):
    plan = make_plan(make_mesh(mesh), strategy, CONFIG, MAX_RANK)
    graphdef, abstract = abstract_model(CONFIG, plan)
    state = jax.device_put(host_params, param_shardings(abstract, plan))
    slot_adapters = ["plain", *NAMES]
    bank = _place_bank([PLAIN, *(_reconstructed(n) for n in NAMES)], plan)
    dense = CompressedServing(DENSE, CONFIG, plan, "dense-bank", "float32")
    block = CompressedServing(BLOCK, CONFIG, plan, "block-bank", "float32")
    assert dense.ids == block.ids
    served = [name if compressed else None for name, compressed in ROWS]
    slots = [0 if c or n is None else slot_adapters.index(n) + 1 for n, c in ROWS]
    row = plan.sharding(("batch",))
    slots, clusters, sigma_ids = (jax.device_put(np.asarray(v, np.int32), row) for v in (slots, *dense.rows(served)))
    adapters = AdapterBatch(bank, slots, compressed={**dense.arrays, **block.arrays}, clusters=clusters,
                            sigma_ids=sigma_ids)
    # rows 0-3 read the same tokens (so rows 0, 1, 2 show that the adapters matter), each later pair its own
    prompts = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (len(ROWS) // 2 - 1, PROMPT))
    tokens = jax.device_put(np.repeat(np.concatenate([prompts[:1], prompts]), 2, axis=0).astype(np.int32),
                            plan.sharding(("batch", "seq")))
    start = jnp.zeros((len(ROWS),), jnp.int32)
    run = jax.jit(lambda *args: forward(graphdef, *args)[0], compiler_options=FAST_COMPILE)
    logits = np.asarray(run(state, tokens, start, None, adapters))
    for i in range(2, len(ROWS), 2):
        np.testing.assert_allclose(logits[i], logits[i + 1], atol=1e-5, rtol=0,
                                   err_msg=f"{ROWS[i][0]} on {mesh} {strategy}")
    assert np.abs(logits[1] - logits[0]).max() > 1e-2 and np.abs(logits[2] - logits[0]).max() > 1e-2


def test_the_block_bank_needs_whole_blocks_per_device():
    plan = make_plan(make_mesh("1x8"), "bdlora", CONFIG, MAX_RANK)
    bank = random_compressed_bank(CONFIG, 2, rank=8, blocks=4, modules=("q_proj",))
    with pytest.raises(CompressedBankError) as info:
        CompressedServing(bank, CONFIG, plan, "/banks/four", "float32")
    for fragment in ("/banks/four", "blocks=4", "mesh 1x8", "model axis 8"):
        assert fragment in str(info.value), str(info.value)


def _apply(serving: CompressedServing, key: str, name: str, x: np.ndarray) -> np.ndarray:
    """x·V·Σᵀ·U from the device arrays of one module, block by block as the devices hold them (numpy)."""
    v, u, sigma = (np.asarray(a) for a in serving.arrays[key])
    cluster, sigma_id = serving.ids[name]
    if v.ndim == 4:  # block-diagonal V: device block i reads input slice i
        step = x.shape[1] // v.shape[1]
        h = np.concatenate([x[:, i * step:(i + 1) * step] @ v[cluster, i] for i in range(v.shape[1])], axis=1)
    else:
        h = x @ v[cluster]
    rs = sigma.shape[2]
    h = np.concatenate([h[:, i * rs:(i + 1) * rs] @ sigma[sigma_id, i].T for i in range(sigma.shape[1])], axis=1)
    if u.ndim == 4:  # block-diagonal U: device block i writes output slice i
        rs = u.shape[2]
        return np.concatenate([h[:, i * rs:(i + 1) * rs] @ u[cluster, i] for i in range(u.shape[1])], axis=1)
    return h @ u[cluster]


@pytest.mark.parametrize("mesh,strategy,blocks", [("1x1", "replicated", 1), ("1x2", "slora", 4), ("1x4", "bdlora", 1),
                                                  ("1x2", "bdlora", 4), ("1x4", "bdlora", 4)])
def test_device_arrays_hold_each_adapters_reconstruction(mesh, strategy, blocks):
    """The host conversion alone: x·V·Σᵀ·U of every adapter and module equals x·D̂ᵀ of its reconstruction."""
    bank = random_compressed_bank(CONFIG, 3, rank=8, clusters=2, blocks=blocks, method="full", seed=7)
    serving = CompressedServing(bank, CONFIG, make_plan(make_mesh(mesh), strategy, CONFIG, MAX_RANK), "b", "float32")
    rng = np.random.default_rng(5)
    for (layer, module), m in bank.modules.items():
        x = rng.normal(size=(3, CONFIG.module_dims(module)[0])).astype(np.float32)
        for i, name in enumerate(bank.names):
            want = x @ m.delta(i, int(bank.clusters[i]), module).T
            np.testing.assert_allclose(_apply(serving, f"{layer}.{module}", name, x), want, atol=1e-5, rtol=0,
                                       err_msg=f"{name} {module}")


# -------------------------------------------------------------------------------- collectives in the HLO (1x8)

TINY = dataclasses.replace(load_model_config_yaml(CONFIGS_DIR / "models" / "tiny.yaml"),
                           num_layers=1)  # 8 kv heads: nothing falls back to replicated on 1x8
SHAPE = DecodeShape(batch=8, max_seq_len=16, max_loras=2, rank=16, dtype="float32")


def _counts(strategy: str, with_lora: bool, bank=None) -> dict:
    plan = make_plan(make_mesh("1x8"), strategy, TINY, SHAPE.rank)
    layout = CompressedLayout.for_bank(bank, TINY, plan, "bank") if bank is not None else None
    counts = count_collectives(compile_decode_step(TINY, plan, SHAPE, with_lora=with_lora, compressed=layout).as_text())
    return {kind: counts.get(kind, {"count": 0, "bytes": 0}) for kind in ("all-reduce", "all-gather")} | counts


@pytest.fixture(scope="module")
def base():
    """The base model's collectives (no adapters, so the same under every strategy): 2 per layer + the embedding."""
    counts = _counts("bdlora", with_lora=False)
    assert counts["all-reduce"]["count"] == 2 * TINY.num_layers + 1 and counts["all-gather"]["count"] == 0
    return counts


def test_bdlora_block_bank_adds_no_collectives(base):
    bank = random_compressed_bank(TINY, 4, rank=16, clusters=2, blocks=8, method="full")
    assert _counts("bdlora", with_lora=True, bank=bank) == base


def test_slora_dense_bank_adds_what_an_uncompressed_bank_adds(base):
    bank = random_compressed_bank(TINY, 4, rank=16, clusters=2, method="full")  # rank 16 = the LoRA bank's
    lora = _counts("slora", with_lora=True)
    both = _counts("slora", with_lora=True, bank=bank)
    rows, rank = SHAPE.batch, SHAPE.rank
    assert lora["all-gather"] == {"count": 5, "bytes": 5 * rows * rank * 4}  # q, k, v, gate, up: x·A gathered
    assert both["all-gather"]["count"] - lora["all-gather"]["count"] == 5
    assert both["all-gather"]["bytes"] - lora["all-gather"]["bytes"] == lora["all-gather"]["bytes"]
    lora_sums = lora["all-reduce"]["bytes"] - base["all-reduce"]["bytes"]  # o, down: x·A summed
    assert lora["all-reduce"]["count"] - base["all-reduce"]["count"] == 2 and lora_sums == 2 * rows * rank * 4
    assert both["all-reduce"]["bytes"] - lora["all-reduce"]["bytes"] == lora_sums
    # XLA's all-reduce combiner may fuse the two rank sums of a module into one tuple all-reduce (it does on CPU)
    assert both["all-reduce"]["count"] - lora["all-reduce"]["count"] in (0, 2)
    assert set(both) == {"all-gather", "all-reduce"}


# ----------------------------------------------------------------------------------- Engine and server

ENGINE_OPTS = {"mesh": "1x8", "strategy": "bdlora", "max_loras": 2, "max_lora_rank": 8, "max_batch": 4,
               "max_seq_len": 32}
GEN_PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [1, 2, 3, 4], [5, 6, 7, 8, 9]]
GEN_ADAPTERS = ["compressed-1", "reconstructed-1", "plain", None]


@pytest.fixture(scope="module")
def bank_dir(hf_dir, tmp_path_factory):
    config = load_model_config(hf_dir / "model")
    bank = random_compressed_bank(config, 3, rank=8, clusters=2, blocks=8, method="diag", seed=4)
    return bank, bank.save(tmp_path_factory.mktemp("bank") / "compressed")


@pytest.fixture(scope="module")
def engine(hf_dir, bank_dir, tmp_path_factory):
    """1x8 bdlora engine serving the compressed bank, the reconstruction of compressed-1 and a BD-LoRA adapter."""
    bank, path = bank_dir
    eng = Engine.from_pretrained(hf_dir / "model", compressed_bank=path, **ENGINE_OPTS)
    root = tmp_path_factory.mktemp("adapters")
    eng.add_adapter("reconstructed-1", write_adapter(bank.reconstruct("compressed-1"), root / "reconstructed-1"))
    eng.add_adapter("plain", random_adapter(eng.model_config, "plain", rank=8, nblocks=8, seed=5))
    return eng


@pytest.fixture(scope="module")
def generated(engine):
    """Greedy completions of one batch mixing a compressed adapter, its reconstruction, another adapter and none."""
    return [c.token_ids for c in engine.generate(GEN_PROMPTS, GEN_ADAPTERS, max_tokens=8)]


def test_engine_generate_serves_compressed_like_reconstructed(engine, generated):
    assert engine.adapters == ["compressed-0", "compressed-1", "compressed-2", "plain", "reconstructed-1"]
    assert generated[0] == generated[1]
    assert generated[0] != generated[3]  # the compressed adapter changes the output
    assert "compressed-1" not in engine.pool.resident  # it never takes a pool slot


def test_engine_name_clash_and_remove_errors(engine, bank_dir, hf_dir):
    _, path = bank_dir
    with pytest.raises(ValueError) as info:
        engine.add_adapter("compressed-2", hf_dir / "adapters" / "lora_r8")
    for fragment in ("'compressed-2'", "lora_r8", str(path)):
        assert fragment in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="compressed bank") as info:
        engine.remove_adapter("compressed-0")
    assert str(path) in str(info.value)
    assert "compressed-0" in engine.adapters and "compressed-2" in engine.adapters
    with pytest.raises(KeyError, match="'nope' is not registered"):
        engine.logits([1, 2], adapter="nope")


def test_engine_bad_bank_directory_names_the_file(hf_dir, bank_dir, tmp_path):
    bad = tmp_path / "bad"
    bank_dir[0].save(bad)
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    manifest["blocks"] = 3
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CompressedBankError) as info:
        Engine.from_pretrained(hf_dir / "model", compressed_bank=bad, **ENGINE_OPTS)
    assert str(bad / MANIFEST_FILE) in str(info.value) and "blocks=3" in str(info.value)
    with pytest.raises(CompressedBankError, match="does not exist"):
        Engine.from_pretrained(hf_dir / "model", compressed_bank=tmp_path / "missing", **ENGINE_OPTS)


def _call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve.test",
                                     timeout=120) as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(go())


def test_server_lists_and_completes_compressed_adapters(engine, generated):
    scheduler = Scheduler(engine)  # after `generated`: Engine.generate never runs beside a scheduler
    scheduler.start()
    try:
        app = create_app(engine, scheduler, "tiny")
        cards = {c["id"]: c for c in _call(app, "GET", "/v1/models").json()["data"]}
        assert {"compressed-0", "compressed-1", "compressed-2"} <= set(cards)
        assert cards["compressed-1"]["parent"] == "tiny"
        response = _call(app, "POST", "/v1/completions", json={"model": "compressed-1", "prompt": GEN_PROMPTS[0],
                                                                "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == engine.tokenizer.decode(generated[0])
        response = _call(app, "POST", "/v1/unload_lora_adapter", json={"lora_name": "compressed-0"})
        assert response.status_code == 400 and "compressed bank" in response.json()["error"]["message"]
        response = _call(app, "POST", "/v1/load_lora_adapter", json={"lora_name": "compressed-0", "lora_path": "x"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "name_taken"
    finally:
        scheduler.stop()
