"""Compression math: planted bases and clusters recovered, monotone JD objectives, projection == refit,
the SVD baseline against numpy, block-diagonal banks, the bank directory and the command line.

Every dense update below is formed with numpy only to check; the fitting code never forms one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from helpers import FIXTURES

from bdlora_jax.adapters.adapter import LoraAdapter, ModuleFactors
from bdlora_jax.adapters.compressed_store import CompressedBankError, load_compressed_bank
from bdlora_jax.adapters.peft_io import read_adapter
from bdlora_jax.adapters.synthetic import random_adapter
from bdlora_jax.checkpoint import load_model_config
from bdlora_jax.compress.__main__ import main as compress_main
from bdlora_jax.compress.compressor import compress_adapters, kmeans, project_adapter
from bdlora_jax.compress.joint import jd_diag, jd_full, truncated_svd_errors
from bdlora_jax.compress.synthetic import random_compressed_bank
from bdlora_jax.config import ModelConfig

CONFIG = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=4,
                     head_dim=12, name="compress-test")
# One module shape and rank 4 wherever possible: every distinct problem shape costs a compilation.
MODULES = ("q_proj",)


def dense(adapter: LoraAdapter, key) -> np.ndarray:
    """D = s·B·A (d_out, d_in) of one module, formed densely (test reference only)."""
    f = adapter.modules[key]
    return adapter.scale * (f.dense_a() @ f.dense_b()).T


def bank_delta(bank, name: str, key) -> np.ndarray:
    i = bank.index(name)
    return bank.modules[key].delta(i, int(bank.clusters[i]), key[1])


def planted(clusters: int, per_cluster: int, rank: int = 4, adapter_rank: int = 4, seed: int = 0,
            diagonal: bool = False):
    """Adapters whose updates are U_c·S_i·V_cᵀ for planted bases per cluster c; their true cluster ids."""
    rng = np.random.default_rng(seed)
    bases = {}
    for c in range(clusters):
        for layer in range(CONFIG.num_layers):
            for module in MODULES:
                d_in, d_out = CONFIG.module_dims(module)
                u, v = rng.normal(size=(d_out, rank)), rng.normal(size=(d_in, rank))
                if not diagonal:
                    u, v = np.linalg.qr(u)[0], np.linalg.qr(v)[0]
                bases[c, layer, module] = (u, v)
    adapters, truth = [], []
    for i in range(clusters * per_cluster):
        c = int(rng.integers(clusters)) if i >= clusters else i
        factors = {}
        for (cc, layer, module), (u, v) in bases.items():
            if cc != c:
                continue
            if diagonal:
                b, a = u * rng.normal(size=rank), v.T
            else:
                b, a = u @ rng.normal(size=(rank, adapter_rank)), rng.normal(size=(adapter_rank, rank)) @ v.T
            factors[(layer, module)] = ModuleFactors(a.astype(np.float32), (b * (i + 1)).astype(np.float32))
        adapters.append(LoraAdapter(f"a{i}", a.shape[0], float(a.shape[0]), factors))
        truth.append(c)
    return adapters, np.array(truth)


def max_error(bank, adapters) -> float:
    worst = 0.0
    for adapter in adapters:
        for key in adapter.modules:
            d = dense(adapter, key)
            worst = max(worst, np.sum((d - bank_delta(bank, adapter.name, key)) ** 2) / np.sum(d ** 2))
    return worst


def stacked(adapters, key):
    a = np.stack([f.a for f in (ad.modules[key] for ad in adapters)])[None]
    b = np.stack([ad.scale * ad.modules[key].b for ad in adapters])[None]
    norms = np.sqrt(np.einsum("gnij,gnji->gn", b.transpose(0, 1, 3, 2) @ b, a @ a.transpose(0, 1, 3, 2)))
    return a.astype(np.float32), (b / norms[..., None, None]).astype(np.float32), np.ones(a.shape[:2], np.float32)


def test_planted_bases_are_recovered_and_the_manifest_says_so():
    adapters, _ = planted(clusters=1, per_cluster=12)
    bank = compress_adapters(adapters, CONFIG, rank=4)
    assert max_error(bank, adapters) < 1e-4
    assert max(float(m.errors.max()) for m in bank.modules.values()) < 1e-4


def test_planted_diagonal_bases_are_recovered_by_jd_diag():
    adapters, _ = planted(clusters=1, per_cluster=12, diagonal=True, seed=3)
    bank = compress_adapters(adapters, CONFIG, rank=4, method="diag", max_iter=300, tol=1e-9)
    assert bank.modules[(0, "q_proj")].sigma.shape == (12, 1, 4)
    assert max_error(bank, adapters) < 1e-4


@pytest.mark.parametrize("method", ["full", "diag"])
def test_jd_objective_never_gets_worse(method):
    adapters = [random_adapter(CONFIG, f"r{i}", 4, seed=i, modules=MODULES) for i in range(16)]
    a, b, w = stacked(adapters, (0, "q_proj"))
    fit = jd_full(a, b, w, rank=4, tol=1e-7, max_iter=60)
    if method == "diag":
        fit = jd_diag(a, b, w, fit.u, fit.v, tol=1e-7, max_iter=60)
    history = fit.history[0, :fit.iterations + 1]
    assert fit.iterations > 5 and history[-1] < history[0]
    # float32 steps: an increase larger than float32 rounding of an O(1) relative error would be a real one
    assert np.all(np.diff(history) <= 1e-6), np.diff(history).max()


def test_planted_clusters_are_found():
    adapters, truth = planted(clusters=3, per_cluster=5, seed=1)
    bank = compress_adapters(adapters, CONFIG, rank=4, clusters=3)
    found = bank.clusters
    pairs = {(int(t), int(f)) for t, f in zip(truth, found)}
    assert len(pairs) == 3 and len({t for t, _ in pairs}) == 3 and len({f for _, f in pairs}) == 3
    assert bank.fit["assignments_settled"]
    assert max_error(bank, adapters) < 1e-4


def test_kmeans_separates_blobs():
    rng = np.random.default_rng(0)
    centers = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    points = np.concatenate([c + rng.normal(0, 0.3, (20, 2)) for c in centers])
    assign = kmeans(points, 3, seed=0)
    assert all(len(set(assign[i * 20:(i + 1) * 20])) == 1 for i in range(3)) and len(set(assign)) == 3


def test_projecting_onto_spanning_bases_equals_refitting():
    adapters, _ = planted(clusters=1, per_cluster=13, seed=2)
    known, new = adapters[:12], adapters[12]
    projected = project_adapter(compress_adapters(known, CONFIG, rank=4), new, CONFIG)
    refitted = compress_adapters(adapters, CONFIG, rank=4)
    assert projected.names[-1] == new.name
    for key in new.modules:
        want = dense(new, key)
        np.testing.assert_allclose(bank_delta(projected, new.name, key), bank_delta(refitted, new.name, key),
                                   atol=1e-4 * np.abs(want).max())
        np.testing.assert_allclose(bank_delta(projected, new.name, key), want, atol=1e-4 * np.abs(want).max())


def test_svd_baseline_matches_numpy():
    adapters = [random_adapter(CONFIG, f"r{i}", 8, seed=i, modules=MODULES) for i in range(4)]
    a, b, _ = stacked(adapters, (0, "q_proj"))
    got = np.asarray(truncated_svd_errors(a[0], b[0], rank=3))
    for i in range(4):
        s = np.linalg.svd(b[0, i].astype(np.float64) @ a[0, i], compute_uv=False) ** 2
        assert got[i] == pytest.approx(s[3:].sum() / s.sum(), rel=1e-4)


def test_block_bank_of_bdlora_adapters_keeps_their_blocks():
    adapters = [random_adapter(CONFIG, f"bd{i}", 8, nblocks=4, seed=i, modules=("q_proj", "down_proj"))
                for i in range(3)]
    bank = compress_adapters(adapters, CONFIG, rank=24, blocks=4)  # rank 6 per block spans 3 adapters' rank-2 blocks
    assert bank.modules[(0, "q_proj")].u.shape == (1, 4, 12, 6)
    assert max_error(bank, adapters) < 1e-4
    rebuilt = bank.reconstruct("bd1")
    assert rebuilt.nblocks == 4 and rebuilt.modules[(0, "q_proj")].b_blocks == 4
    assert rebuilt.modules[(0, "down_proj")].a_blocks == 4
    for key in rebuilt.modules:
        np.testing.assert_allclose(dense(rebuilt, key), bank_delta(bank, "bd1", key), atol=1e-5)


def test_bank_directory_round_trip_and_errors(tmp_path):
    bank = dataclasses.replace(random_compressed_bank(CONFIG, 6, 4, clusters=2, method="diag"),
                               sources=tuple(f"/x/{i}" for i in range(6)))
    bank.save(tmp_path / "bank")
    loaded = load_compressed_bank(tmp_path / "bank", CONFIG)
    assert loaded.names == bank.names and np.array_equal(loaded.clusters, bank.clusters)
    for key, m in bank.modules.items():
        np.testing.assert_array_equal(loaded.modules[key].sigma, m.sigma)
        np.testing.assert_allclose(loaded.modules[key].errors, m.errors, rtol=1e-6)
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert manifest["method"] == "diag" and manifest["adapters"][0]["source"] == "/x/0"

    manifest["adapters"][1]["cluster"] = 7
    (tmp_path / "bank" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CompressedBankError, match=r"manifest.json: adapters\[1\].*cluster 7"):
        load_compressed_bank(tmp_path / "bank", CONFIG)
    other = ModelConfig(**{**CONFIG.__dict__, "hidden_size": 24, "head_dim": 6})
    manifest["adapters"][1]["cluster"] = 0
    (tmp_path / "bank" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CompressedBankError, match=r"bank.safetensors: tensor '0\.\w+\.U' has shape"):
        load_compressed_bank(tmp_path / "bank", other)
    with pytest.raises(CompressedBankError, match="does not exist"):
        load_compressed_bank(tmp_path / "missing", CONFIG)


def test_bad_settings_are_refused():
    adapters = [random_adapter(CONFIG, "x", 4, modules=MODULES)]
    with pytest.raises(ValueError, match="clusters=2"):
        compress_adapters(adapters, CONFIG, rank=4, clusters=2)
    with pytest.raises(ValueError, match="method='svd'"):
        compress_adapters(adapters, CONFIG, rank=4, method="svd")
    with pytest.raises(ValueError, match="blocks=5 does not divide q_proj"):
        compress_adapters(adapters, CONFIG, rank=5, blocks=5)
    with pytest.raises(ValueError, match="unique"):
        compress_adapters(adapters * 2, CONFIG, rank=4)


def test_command_line_compresses_peft_directories(tmp_path, capsys):
    model, collection, out = FIXTURES / "model", tmp_path / "collection", tmp_path / "bank"
    for name in ("qv-1", "qv-2"):  # a directory of adapters; the q/v-only fixture keeps compilations few
        shutil.copytree(FIXTURES / "adapters" / "lora_rs_r4_qv", collection / name)
    code = compress_main(["--adapters", str(collection), "--model", str(model), "--rank", "4", "--out", str(out),
                          "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    config = load_model_config(model)
    bank = load_compressed_bank(out, config)
    assert report["adapters"] == 2 and set(bank.names) == set(report["mean_error"]) == {"qv-1", "qv-2"}
    for name in bank.names:
        adapter = read_adapter(collection / name, config, name)
        i = bank.index(name)
        for key in adapter.modules:
            d = dense(adapter, key)
            got = np.sum((d - bank_delta(bank, name, key)) ** 2) / np.sum(d ** 2)
            assert got == pytest.approx(bank.modules[key].errors[i], abs=1e-5)
    assert compress_main(["--adapters", str(tmp_path), "--model", str(model), "--rank", "4", "--out",
                          str(tmp_path / "x")]) == 2
    assert "neither a PEFT adapter directory" in capsys.readouterr().err
