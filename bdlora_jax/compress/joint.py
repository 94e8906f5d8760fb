"""Joint diagonalisation of many low-rank updates D_i = B_i·A_i into shared bases: D_i ≈ U·Σ_i·Vᵀ.

A fitting problem is factors a (n, r_i, d_in) and b (n, d_out, r_i) in PEFT orientation (D_i = b_i @ a_i,
already scaled and normalised to unit Frobenius norm by the caller) and weights w (n,) that are 1 for the
adapters being fitted and 0 for padding; jd_full and jd_diag fit k such groups at once (leading axis k) and
iterate on the host, one jitted step per iteration, until no group's error improves by more than `tol`. Nothing of size d_out × d_in is ever formed:
D_i·V = B_i·(A_i·V), D_iᵀ·U = A_iᵀ·(B_iᵀ·U) and ‖D_i‖² = tr((B_iᵀB_i)(A_iA_iᵀ)).

- JD-Full: orthonormal U, V and full Σ_i = Uᵀ·D_i·V. Alternating subspace iteration on the objective
  Σ_i w_i ‖Uᵀ·D_i·V‖²: each half step replaces U by the best rank-r subspace of span(U, M_U·U) with
  M_U = Σ_i w_i (D_i V)(D_i V)ᵀ (a Rayleigh-Ritz step whose search space contains the old U, so the objective
  never decreases), then the same for V. Stops when the relative error improves by less than `tol`.
- JD-Diag: Σ_i diagonal, U and V free; alternating least squares (σ, then U, then V, each an exact
  minimiser) with the scale rebalanced every step, started from JD-Full.
- The per-adapter truncated SVD is the baseline, from QR of each factor and an SVD of the r_i × r_i core.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

RIDGE = 1e-7


class Fit(NamedTuple):
    """Bases and per-adapter matrices of k groups; history[g, t] is group g's relative error after t iterations."""

    u: jax.Array
    v: jax.Array
    sigma: jax.Array
    history: np.ndarray
    iterations: int


def squared_norms(a: jax.Array, b: jax.Array) -> jax.Array:
    """‖B_i·A_i‖²_F for every adapter, from r_i × r_i Gram matrices."""
    return jnp.einsum("nkl,nlk->n", jnp.einsum("nok,nol->nkl", b, b), jnp.einsum("nkd,nld->nkl", a, a))


def sigma_full(a: jax.Array, b: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """Σ_i = Uᵀ·D_i·V (n, r, r): the best Σ_i for orthonormal bases, and the projection onto them."""
    return jnp.einsum("nrk,nks->nrs", jnp.einsum("or,nok->nrk", u, b), jnp.einsum("nkd,ds->nks", a, v))


def sigma_diag(a: jax.Array, b: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """The best diagonal σ_i (n, r) for any bases: solve ((UᵀU)∘(VᵀV))·σ_i = diag(Uᵀ·D_i·V)."""
    gram = (u.T @ u) * (v.T @ v)
    rhs = jnp.einsum("nrr->nr", sigma_full(a, b, u, v))
    return _solve_sym(gram, rhs.T).T


def relative_errors(a: jax.Array, b: jax.Array, u: jax.Array, v: jax.Array, sigma: jax.Array) -> jax.Array:
    """‖D_i − U·Σ_i·Vᵀ‖² / ‖D_i‖² per adapter (0 where D_i = 0); sigma (n, r, r) or diagonal (n, r)."""
    if sigma.ndim == 2:
        sigma = sigma[:, :, None] * jnp.eye(sigma.shape[-1], dtype=sigma.dtype)
    norms = squared_norms(a, b)
    cross = jnp.einsum("nrs,nrs->n", sigma, sigma_full(a, b, u, v))
    fitted = jnp.einsum("nrs,rt,nts->n", jnp.einsum("nrs,su->nru", sigma, v.T @ v), u.T @ u, sigma)
    err = norms - 2.0 * cross + fitted
    return jnp.where(norms > 0, jnp.maximum(err, 0.0) / jnp.where(norms > 0, norms, 1.0), 0.0)


def _solve_sym(gram: jax.Array, rhs: jax.Array) -> jax.Array:
    """gram⁻¹·rhs for a symmetric positive semi-definite gram, with a tiny ridge against collinear columns."""
    ridge = RIDGE * jnp.maximum(jnp.trace(gram) / gram.shape[0], 1e-30)
    return jnp.linalg.solve(gram + ridge * jnp.eye(gram.shape[0], dtype=gram.dtype), rhs)


def _ritz(basis: jax.Array, images: jax.Array, w: jax.Array, rank: int) -> jax.Array:
    """Best rank-r subspace of span(basis, M·basis) for M = Σ_i w_i Y_i Y_iᵀ given images Y_i (n, d, r)."""
    m_basis = jnp.einsum("n,ndr,nrp->dp", w, images, jnp.einsum("ndr,dp->nrp", images, basis))
    search, _ = jnp.linalg.qr(jnp.concatenate([basis, m_basis], axis=1))
    projected = jnp.einsum("ndr,dp->nrp", images, search)
    small = jnp.einsum("n,nrp,nrq->pq", w, projected, projected)
    _, vectors = jnp.linalg.eigh(small)
    return search @ vectors[:, ::-1][:, :rank]


def _full_objective(a, b, w, u, v) -> jax.Array:
    s = sigma_full(a, b, u, v)
    return jnp.einsum("n,nrs,nrs->", w, s, s)


def initial_v(a: jax.Array, w: jax.Array, probe: jax.Array) -> jax.Array:
    """A start for V inside the adapters' input subspace: orthonormalised Σ_i w_i A_iᵀ·G_i for a probe G (n, r_i, r)."""
    v, _ = jnp.linalg.qr(jnp.einsum("n,nkd,nkr->dr", w, a, probe))
    return v


def _full_step(a, b, w, u, v, total, rank: int):
    """One alternation of JD-Full: a Rayleigh-Ritz step on U, then on V; returns them and the relative error."""
    images = jnp.einsum("nok,nkr->nor", b, jnp.einsum("nkd,dr->nkr", a, v))
    u = _ritz(u, images, w, rank)
    images_t = jnp.einsum("nkd,nkr->ndr", a, jnp.einsum("nok,or->nkr", b, u))
    v = _ritz(v, images_t, w, rank)
    return u, v, 1.0 - _full_objective(a, b, w, u, v) / total


def _full_start(a, b, w, v, probe_u):
    """U as the best subspace of a probe of the D_i·V for a start V; with their relative error."""
    total = jnp.maximum(jnp.sum(w * squared_norms(a, b)), 1e-30)
    v, _ = jnp.linalg.qr(v)
    images = jnp.einsum("nok,nkr->nor", b, jnp.einsum("nkd,dr->nkr", a, v))
    start, _ = jnp.linalg.qr(jnp.einsum("n,nor,nrs->os", w, images, probe_u))
    u = _ritz(start, images, w, v.shape[1])
    return u, v, total, 1.0 - _full_objective(a, b, w, u, v) / total


def _diag_step(a, b, w, u, v, total):
    """One sweep of JD-Diag's least squares (σ, U, V) and the rescale; returns U, V, σ and the relative error."""
    sigma = sigma_diag(a, b, u, v) * w[:, None]
    weight = sigma.T @ sigma
    images = jnp.einsum("nok,nkr->nor", b, jnp.einsum("nkd,dr->nkr", a, v))
    u = _solve_sym((v.T @ v) * weight, jnp.einsum("nor,nr->or", images, sigma).T).T
    images_t = jnp.einsum("nkd,nkr->ndr", a, jnp.einsum("nok,or->nkr", b, u))
    v = _solve_sym((u.T @ u) * weight, jnp.einsum("ndr,nr->dr", images_t, sigma).T).T
    sigma = sigma_diag(a, b, u, v) * w[:, None]
    scale = jnp.maximum(jnp.linalg.norm(sigma), 1e-30)
    sigma, u = sigma / scale, u * scale
    balance = jnp.sqrt(jnp.maximum(jnp.linalg.norm(v), 1e-30) / jnp.maximum(jnp.linalg.norm(u), 1e-30))
    u, v = u * balance, v / balance
    return u, v, sigma, _diag_error(a, b, w, u, v, sigma, total)


def _diag_error(a, b, w, u, v, sigma, total) -> jax.Array:
    return jnp.sum(w * squared_norms(a, b) * relative_errors(a, b, u, v, sigma)) / total


def _diag_start(a, b, w, u, v):
    total = jnp.maximum(jnp.sum(w * squared_norms(a, b)), 1e-30)
    sigma = sigma_diag(a, b, u, v) * w[:, None]
    return sigma, total, _diag_error(a, b, w, u, v, sigma, total)


_initial_v_groups = jax.jit(jax.vmap(initial_v))
_full_start_groups = jax.jit(jax.vmap(_full_start))
_full_step_groups = jax.jit(jax.vmap(_full_step, in_axes=(0, 0, 0, 0, 0, 0, None)), static_argnums=6)
_diag_start_groups = jax.jit(jax.vmap(_diag_start))
_diag_step_groups = jax.jit(jax.vmap(_diag_step))


def _improving(history: list[np.ndarray], tol: float) -> bool:
    """True while some group's relative error still drops by more than tol (relative) per iteration."""
    if len(history) < 3:
        return True
    prev, err = history[-2], history[-1]
    return bool(np.any(prev - err > tol * np.maximum(prev, 1e-30)))


def jd_full(a: jax.Array, b: jax.Array, w: jax.Array, *, rank: int, tol: float = 1e-5, max_iter: int = 100,
            seed: int = 0, v0: jax.Array | None = None) -> Fit:
    """JD-Full of k groups at once (a (k, n, r_i, d_in), b (k, n, d_out, r_i), w (k, n)): alternating subspace steps.

    v0 (k, d_in, rank), e.g. the bases of a previous fit, replaces the random start inside the adapters' span.
    """
    rng = np.random.default_rng(seed)
    k, n, r_i = a.shape[:3]
    if v0 is None:
        v0 = _initial_v_groups(a, w, rng.standard_normal((k, n, r_i, rank)).astype(np.float32))
    probe_u = rng.standard_normal((k, n, rank, rank)).astype(np.float32)
    u, v, total, err = _full_start_groups(a, b, w, v0, probe_u)
    history = [np.asarray(err, np.float64)]
    while len(history) <= max_iter and _improving(history, tol):
        u, v, err = _full_step_groups(a, b, w, u, v, total, rank)
        history.append(np.asarray(err, np.float64))
    return Fit(u, v, jax.vmap(sigma_full)(a, b, u, v), np.stack(history, axis=1), len(history) - 1)


def jd_diag(a: jax.Array, b: jax.Array, w: jax.Array, u: jax.Array, v: jax.Array, *, tol: float = 1e-5,
            max_iter: int = 100) -> Fit:
    """JD-Diag of k groups at once by alternating least squares with rescaling, from bases u, v (e.g. JD-Full's)."""
    sigma, total, err = _diag_start_groups(a, b, w, u, v)
    history = [np.asarray(err, np.float64)]
    while len(history) <= max_iter and _improving(history, tol):
        u, v, sigma, err = _diag_step_groups(a, b, w, u, v, total)
        history.append(np.asarray(err, np.float64))
    return Fit(u, v, sigma, np.stack(history, axis=1), len(history) - 1)


@partial(jax.jit, static_argnames=("rank",))
def truncated_svd_errors(a: jax.Array, b: jax.Array, *, rank: int) -> jax.Array:
    """Relative error of each adapter's own best rank-`rank` approximation (the per-adapter SVD baseline)."""
    _, r_b = jnp.linalg.qr(b)
    _, r_a = jnp.linalg.qr(jnp.swapaxes(a, 1, 2))
    values = jnp.linalg.svd(jnp.einsum("nij,nkj->nik", r_b, r_a), compute_uv=False) ** 2
    total = jnp.sum(values, axis=1)
    return jnp.where(total > 0, jnp.sum(values[:, rank:], axis=1) / jnp.where(total > 0, total, 1.0), 0.0)
