"""Compress a collection of adapters into a CompressedBank: JD per (layer, module, block), with clustering.

With k clusters every adapter gets one cluster id for all layers. The start is k-means on normalised
features (sketches of each adapter's column and row spaces in every module), then rounds of:
fit JD inside each cluster, move every adapter to the cluster whose bases reconstruct it best (summed relative
error over all modules, Σ re-solved for those bases), until no assignment changes. A new adapter is projected
onto existing bases the same way, without refitting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..adapters.adapter import LoraAdapter
from ..adapters.compressed_store import METHODS, CompressedBank, CompressedModule, block_dims
from ..config import COLUMN_MODULES, ModelConfig
from .joint import jd_diag, jd_full, relative_errors, sigma_diag, sigma_full
from .problems import Problem, build_problems, target_modules

SKETCH = 4  # random directions per subspace in the clustering features


def _fit_groups(a, b, members, tol: float, *, rank: int, max_iter: int, method: str, v0=None):
    """JD of every group of adapters (members (k, m), -1 = padding) on one problem: U (k, d_out, r), V, iterations.

    v0: start bases per group (a previous round's), so a refit after a few reassignments takes few iterations.
    """
    w = (members >= 0).astype(a.dtype)
    index = jnp.maximum(members, 0)
    ga, gb = a[index], b[index]
    fit = jd_full(ga, gb, w, rank=rank, tol=tol, max_iter=max_iter, v0=v0)
    if method == "diag":
        fit = jd_diag(ga, gb, w, fit.u, fit.v, tol=tol, max_iter=max_iter)
    return fit.u, fit.v, fit.iterations


@partial(jax.jit, static_argnames=("method",))
def _project(a, b, u, v, *, method: str):
    """Every adapter projected onto every cluster's bases: relative errors (k, n) and Σ (k, n, r[, r])."""
    def one(u, v):
        sigma = sigma_full(a, b, u, v) if method == "full" else sigma_diag(a, b, u, v)
        return relative_errors(a, b, u, v, sigma), sigma

    return jax.vmap(one)(u, v)


def _members(assign: np.ndarray, k: int) -> np.ndarray:
    """(k, m) adapter indices per cluster padded with -1, m rounded up to a power of two (few compiled shapes)."""
    groups = [np.flatnonzero(assign == c) for c in range(k)]
    width = 1 << max(0, math.ceil(math.log2(max(1, max(len(g) for g in groups)))))
    out = np.full((k, width), -1, np.int32)
    for c, g in enumerate(groups):
        out[c, :len(g)] = g
    return out


def _lloyd(features: np.ndarray, k: int, rng: np.random.Generator, iterations: int) -> tuple[np.ndarray, float]:
    """One k-means run from a k-means++ seeding: (cluster id per row, inertia)."""
    centers = [features[rng.integers(len(features))]]
    for _ in range(1, k):
        dist = np.min([((features - c) ** 2).sum(1) for c in centers], axis=0)
        total = dist.sum()
        pick = rng.choice(len(features), p=dist / total) if total > 0 else rng.integers(len(features))
        centers.append(features[pick])
    centers = np.stack(centers)
    assign = np.full(len(features), -1)
    for _ in range(iterations):
        new = np.argmin((centers ** 2).sum(1) - 2.0 * features @ centers.T, axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            if np.any(assign == c):
                centers[c] = features[assign == c].mean(0)
    return assign, float(((features - centers[assign]) ** 2).sum())


def kmeans(features: np.ndarray, k: int, seed: int, restarts: int = 10, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, the best of `restarts` runs; returns a cluster id per row."""
    rng = np.random.default_rng(seed)
    runs = [_lloyd(features, k, rng, iterations) for _ in range(restarts)]
    return min(runs, key=lambda run: run[1])[0]


def _fill_empty(assign: np.ndarray, costs: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the worst-reconstructed adapter of a cluster that has more than one."""
    assign = assign.copy()
    for c in range(k):
        if np.any(assign == c):
            continue
        counts = np.bincount(assign, minlength=k)
        own = costs[assign, np.arange(len(assign))]
        own[counts[assign] < 2] = -np.inf
        assign[int(np.argmax(own))] = c
    return assign


class _Fitter:
    """The problems of one collection and the settings they are fitted with."""

    def __init__(self, problems: list[Problem], rank_b: int, method: str, tol: float, max_iter: int, progress: bool):
        self.problems, self.rank_b, self.method = problems, rank_b, method
        self.tol, self.max_iter, self.progress = tol, max_iter, progress
        self.iterations = 0

    def _bar(self, desc: str):
        from tqdm import tqdm

        return tqdm(self.problems, desc=desc, disable=not self.progress, leave=False)

    def fit(self, assign: np.ndarray, k: int, desc: str, start=None):
        """Bases of every problem for an assignment: list of (U (k, d_out, r), V (k, d_in, r)); start: earlier bases."""
        members = jnp.asarray(_members(assign, k))
        out = []
        for i, p in enumerate(self._bar(desc)):
            v0 = start[i][1] if start is not None else None
            u, v, iters = _fit_groups(jnp.asarray(p.a), jnp.asarray(p.b), members, self.tol, v0=v0,
                                      rank=self.rank_b, max_iter=self.max_iter, method=self.method)
            self.iterations = max(self.iterations, iters)
            out.append((u, v))
        return out

    def project(self, bases):
        """Per problem: relative errors (k, n) and Σ (k, n, ...) of every adapter on every cluster."""
        return [_project(jnp.asarray(p.a), jnp.asarray(p.b), u, v, method=self.method)
                for p, (u, v) in zip(self.problems, bases)]


def subspace_features(problems: list[Problem], sketch: int = SKETCH, seed: int = 0) -> np.ndarray:
    """Per adapter, its column and row spaces in every problem as sketched projectors P·S, unit-normalised.

    ⟨P_i·S, P_j·S⟩ estimates tr(P_i·P_j) (S Gaussian, scaled), the overlap of two adapters' subspaces: adapters
    that share bases are close whatever their own mixing matrices, which is what a cluster can serve.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for p in problems:
        for factor in (p.b, np.swapaxes(p.a, 1, 2)):
            probe = rng.standard_normal((factor.shape[1], sketch)) / np.sqrt(sketch)
            q = np.linalg.qr(factor.astype(np.float64))[0]
            parts.append((q @ (np.swapaxes(q, 1, 2) @ probe)).reshape(len(factor), -1))
    features = np.concatenate(parts, axis=1)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def _check(adapters: Sequence[LoraAdapter], config: ModelConfig, rank: int, clusters: int, method: str,
           blocks: int) -> None:
    if not adapters:
        raise ValueError("no adapters to compress")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if blocks < 1 or rank < 1 or rank % blocks:
        raise ValueError(f"rank={rank}, blocks={blocks}: expected positive integers with blocks dividing rank")
    if not 1 <= clusters <= len(adapters):
        raise ValueError(f"clusters={clusters}: expected 1..{len(adapters)} (the number of adapters)")
    for _, module in target_modules(adapters):
        d_in, d_out = config.module_dims(module)
        split = d_out if module in COLUMN_MODULES else d_in
        if split % blocks:
            raise ValueError(f"blocks={blocks} does not divide {module}'s {split} "
                             f"{'outputs' if module in COLUMN_MODULES else 'inputs'}")
        d_in_b, d_out_b = block_dims(config, module, blocks)
        if rank // blocks > min(d_in_b, d_out_b):
            raise ValueError(f"rank={rank} with blocks={blocks} gives {rank // blocks} per block, more than "
                             f"{module}'s block of {d_out_b} x {d_in_b} allows")


def compress_adapters(adapters: Sequence[LoraAdapter], config: ModelConfig, rank: int, clusters: int = 1,
                      method: str = "full", blocks: int = 1, *, tol: float = 1e-5, max_iter: int = 100,
                      max_rounds: int = 10, seed: int = 0, progress: bool = False,
                      sources: Sequence[str] = ()) -> CompressedBank:
    """Compress adapters into shared bases (rank `rank` per module, split over `blocks`) in `clusters` clusters."""
    _check(adapters, config, rank, clusters, method, blocks)
    rank_b, n = rank // blocks, len(adapters)
    problems = [problem for layer, module in target_modules(adapters)
                for problem in build_problems(adapters, layer, module, blocks, config)]
    fitter = _Fitter(problems, rank_b, method, tol, max_iter, progress)
    assign, rounds, settled = np.zeros(n, np.int64), 0, True
    if clusters > 1:
        assign, settled = kmeans(subspace_features(problems, seed=seed), clusters, seed), False
    bases = fitter.fit(assign, clusters, "fit")
    projected = fitter.project(bases)
    while clusters > 1 and rounds < max_rounds:
        rounds += 1
        costs = sum(np.asarray(errors, np.float64) for errors, _ in projected)
        new = _fill_empty(np.argmin(costs, axis=0), costs, clusters)
        if np.array_equal(new, assign):
            settled = True
            break
        assign = new
        bases = fitter.fit(assign, clusters, f"clusters: round {rounds}", start=bases)
        projected = fitter.project(bases)
    fit_info = {"tol": tol, "max_iter": max_iter, "max_iterations_used": fitter.iterations, "rounds": rounds,
                "assignments_settled": settled, "seed": seed}
    return _assemble(adapters, config, problems, bases, projected, assign, rank, blocks, method, sources, fit_info)


def _assemble(adapters, config, problems, bases, projected, assign, rank, blocks, method, sources,
              fit_info) -> CompressedBank:
    """Gather per-problem fits into modules: bases per block, Σ with the norm restored, module-level errors."""
    n, rows = len(adapters), np.arange(len(adapters))
    modules = {}
    for start in range(0, len(problems), blocks):
        group = range(start, start + blocks)
        layer, module = problems[start].layer, problems[start].module
        u = np.stack([np.asarray(bases[i][0]) for i in group], axis=1)
        v = np.stack([np.asarray(bases[i][1]) for i in group], axis=1)
        sigma = np.stack([np.asarray(projected[i][1])[assign, rows] for i in group], axis=1)
        norms = np.stack([problems[i].norms for i in group], axis=1).astype(np.float64)
        errors = np.stack([np.asarray(projected[i][0], np.float64)[assign, rows] for i in group], axis=1)
        energy = (norms ** 2).sum(1)
        module_errors = np.where(energy > 0, (norms ** 2 * errors).sum(1) / np.where(energy > 0, energy, 1.0), 0.0)
        scale = norms.reshape(n, blocks, *([1] * (sigma.ndim - 2)))
        modules[(layer, module)] = CompressedModule(u, v, (sigma * scale).astype(np.float32), module_errors)
    return CompressedBank(tuple(a.name for a in adapters), assign.astype(np.int32), method, rank, blocks, modules,
                          tuple(sources), adapters[0].base_model, fit_info)


def project_adapter(bank: CompressedBank, adapter: LoraAdapter, config: ModelConfig) -> CompressedBank:
    """The bank with `adapter` added onto its existing bases (best cluster, Σ solved), nothing refitted."""
    if adapter.name in bank.names:
        raise ValueError(f"compressed bank already has an adapter named {adapter.name!r}")
    missing = set(adapter.modules) - set(bank.modules)
    if missing:
        raise ValueError(f"adapter {adapter.name!r} adapts {sorted(missing)}, which the bank has no bases for")
    keys = sorted(bank.modules)
    problems = [problem for layer, module in keys
                for problem in build_problems([adapter], layer, module, bank.blocks, config)]
    bases = [(jnp.asarray(bank.modules[(p.layer, p.module)].u[:, p.block]),
              jnp.asarray(bank.modules[(p.layer, p.module)].v[:, p.block])) for p in problems]
    projected = [_project(jnp.asarray(p.a), jnp.asarray(p.b), u, v, method=bank.method)
                 for p, (u, v) in zip(problems, bases)]
    cluster = int(np.argmin(sum(np.asarray(e, np.float64)[:, 0] for e, _ in projected)))
    single = _assemble([adapter], config, problems, bases, projected, np.array([cluster]), bank.rank, bank.blocks,
                       bank.method, (), None)
    modules = {key: CompressedModule(m.u, m.v, np.concatenate([m.sigma, single.modules[key].sigma]),
                                     np.concatenate([m.errors, single.modules[key].errors]))
               for key, m in bank.modules.items()}
    sources = tuple(bank.sources) + ("",) if bank.sources else ()
    return CompressedBank(bank.names + (adapter.name,), np.append(bank.clusters, cluster).astype(np.int32),
                          bank.method, bank.rank, bank.blocks, modules, sources, bank.base_model, bank.fit)
