"""QuantEase: cyclic block-coordinate descent on the Hessian-weighted error (SPEC §5).

Glossary: K = input (contraction) dim, N = output dim, p = grid dimension, n = grid points,
g = scale group size, codes ``(K/p, N)`` (one per p-vector of rows), scales ``(K/g, N)`` fixed,
Sigma = X^T X ``(K, K)``, R = W - W_hat (residual), P = Sigma R (maintained residual product),
f = tr(R^T Sigma R) (the objective), S = sparse full-precision outliers (W ~ W_hat + S).

Block update (exact minimisation over the grid, no matrix inverse). For the p rows B of block j and
one column, with all other rows fixed, f is, up to a constant,
``(w_hat_B - u_B)^T A (w_hat_B - u_B)`` with ``A = Sigma[B, B]`` and
``u_B = W_B + A^{-1} Sigma[B, rest] R_rest`` (for p = 1 this is QuantEase's
``u_j = W_j + sum_{k != j} R_k Sigma_kj / Sigma_jj``). Since
``A u_B = P_B + A w_hat_B(current)``, the A-weighted distance to every candidate
``s * g_m`` (s the fixed scale, g_m a grid point) is, up to a constant,
``s^2 g_m^T A g_m - 2 s g_m^T (P_B + A w_hat_B)`` -- evaluated for all n points, no inverse and no
division by A (dead inputs with A = 0 are fine: every candidate scores the same). The best
candidate replaces the current code only if it scores strictly lower, so f never increases
(monotone up to float rounding). For p = 1 the A-weighted nearest point is the plain nearest
point of u_j (QuantEase exactly); for p > 1 it is the A-metric nearest point, which is what makes the
step an exact block minimisation (Euclidean nearest rounding of u_B would not be monotone).

After each block, ``P -= Sigma[:, B] @ delta_B``, so one sweep costs O(K^2 N) like one GPTQ pass;
the update is applied lazily per batch of up to 128 rows (only the batch's rows of P are read inside
it). P is recomputed exactly at the start of every sweep so rounding does not accumulate.

Outlier-aware variant: minimise tr(E^T Sigma E), E = W_hat + S - W, over codes and a k-sparse S
(k = round(fraction * K * N), full precision). After the plain sweeps, alternate ``outlier_iters``
rounds of (a) ``iht_steps`` iterative-hard-thresholding steps
``S <- H_k(S - eta * 2 Sigma E)``, ``eta = 1 / (2 lambda)``, lambda >= lambda_max(Sigma) from
power iteration (doubled and the step rejected if f would increase, which keeps every step
monotone even if the estimate was low), H_k keeping the k largest magnitudes; (b) one
coordinate-descent sweep on the target W - S. Every step is monotone, and the variant starts from
the plain solution, so its objective is <= that of plain QuantEase with the same num_sweeps.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from higgs_jax.datawise.gptq import (
    _is_concrete,
    _mm,
    _validate_problem,
    dequantize_codes,
    first_argmin,
    nearest_grid_code,
)

__all__ = ["QuantEaseInfo", "quantease_quantize"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["initial_objective", "objective", "history", "changed", "outlier_lambda"],
    meta_fields=["num_sweeps", "outlier_iters", "iht_steps", "num_outliers"],
)
@dataclasses.dataclass(frozen=True)
class QuantEaseInfo:
    """Diagnostics of one `quantease_quantize` call (a pytree).

    Attributes:
      num_sweeps, outlier_iters, iht_steps: the schedule run (outlier fields 0 without outliers).
      num_outliers: k, the number of stored outliers (0 without outliers).
      initial_objective: tr(E^T Sigma E) of the warm start.
      objective: final tr(E^T Sigma E) (with outliers included when enabled).
      history: when ``return_history``: objective before the first sweep and after every step,
        ``[f0, f after sweep 1, ..., f after sweep num_sweeps]`` followed, with outliers, by
        ``[f after IHT, f after sweep]`` per outlier round; non-increasing. Else None.
      changed: when ``return_history``: number of codes changed by each sweep (same order as the
        sweeps in history). Else None.
      outlier_lambda: the lambda (>= lambda_max(Sigma) estimate) of the final IHT step size
        1/(2 lambda), or None without outliers.
    """

    num_sweeps: int
    outlier_iters: int
    iht_steps: int
    num_outliers: int
    initial_objective: jax.Array
    objective: jax.Array
    history: jax.Array | None
    changed: jax.Array | None
    outlier_lambda: jax.Array | None


def _batch_blocks(k: int, p: int, max_rows: int = 128) -> int:
    """Blocks per lazy batch: the largest divisor of K/p with at most max_rows rows."""
    m = k // p
    return max(d for d in range(1, max(1, max_rows // p) + 1) if m % d == 0)


def _grid_quadratic_forms(sigma, grid, p):
    """``qd[j, m] = g_m^T A_j g_m`` for every p-block j (A_j = Sigma[B_j, B_j]): (K/p, n).

    Depends on Sigma only, so it is computed once per call instead of in every block step.
    """
    nb = sigma.shape[0] // p
    a_all = sigma.reshape(nb, p, nb, p)[jnp.arange(nb), :, jnp.arange(nb), :]  # (K/p, p, p)
    ga = jnp.einsum("np,jpq->jnq", grid, a_all, precision=lax.Precision.HIGHEST)
    return jnp.sum(ga * grid[None], -1)


def _sweep(target, sigma, grid, scale_rows, codes, qd_all, *, p):
    """One cyclic sweep over the K/p blocks. Returns (codes, objective before sweep, changed).

    `qd_all` is `_grid_quadratic_forms(sigma, grid, p)`.

    Lazy batches (as in GPTQ): within a batch of rows only the batch's own rows of P = Sigma R are
    updated after each block (they are the only ones read there); the rest of P gets the batch's
    accumulated change in one matmul. Same result as updating all of P after every block, with one
    (K, rows) x (rows, N) matmul per batch instead of K/p memory-bound rank-p updates.
    """
    k, n_cols = target.shape
    gq = grid  # (n, p)
    nb = _batch_blocks(k, p)
    rows = nb * p

    def deq(c, s):  # codes (N,), scales (N,) -> (p, N)
        return gq[c].T * s

    w_hat = dequantize_codes(codes, gq, scale_rows, 1)
    r = target - w_hat
    pr = _mm(sigma, r)
    f0 = jnp.sum(r * pr)

    def batch_body(b, c):
        pr, codes, changed = c
        b0 = b * rows
        sig_bb = lax.dynamic_slice(sigma, (b0, b0), (rows, rows))
        pbat = lax.dynamic_slice(pr, (b0, 0), (rows, n_cols))
        sbat = lax.dynamic_slice(scale_rows, (b0, 0), (rows, n_cols))
        cbat = lax.dynamic_slice(codes, (b * nb, 0), (nb, n_cols))
        qdbat = lax.dynamic_slice(qd_all, (b * nb, 0), (nb, qd_all.shape[1]))

        def body(t, c):
            pbat, cbat, dbat, changed = c
            r0 = t * p
            a = lax.dynamic_slice(sig_bb, (r0, r0), (p, p))
            scol = lax.dynamic_slice(sig_bb, (0, r0), (rows, p))
            pb = lax.dynamic_slice(pbat, (r0, 0), (p, n_cols))
            s = lax.dynamic_slice(sbat, (r0, 0), (1, n_cols))[0]
            cur = lax.dynamic_slice(cbat, (t, 0), (1, n_cols))[0]
            cur_v = deq(cur, s)
            au = pb + _mm(a, cur_v)  # A u_B, (p, N)
            qd = qdbat[t]  # g_m^T A g_m, (n,)
            score = (s * s)[None, :] * qd[:, None] - 2.0 * s[None, :] * _mm(gq, au)  # (n, N)
            best, best_score = first_argmin(score, axis=0)
            cur_score = jnp.take_along_axis(score, cur[None], axis=0)[0]
            new = jnp.where(best_score < cur_score, best, cur)
            delta = deq(new, s) - cur_v  # change of W_hat_B; R_B -= delta
            pbat = pbat - _mm(scol, delta)
            dbat = lax.dynamic_update_slice(dbat, delta, (r0, 0))
            cbat = lax.dynamic_update_slice(cbat, new[None], (t, 0))
            return pbat, cbat, dbat, changed + jnp.sum(new != cur)

        init = (pbat, cbat, jnp.zeros((rows, n_cols), jnp.float32), changed)
        _, cbat, dbat, changed = lax.fori_loop(0, nb, body, init)
        pr = pr - _mm(lax.dynamic_slice(sigma, (0, b0), (k, rows)), dbat)
        codes = lax.dynamic_update_slice(codes, cbat, (b * nb, 0))
        return pr, codes, changed

    _, codes, changed = lax.fori_loop(0, k // rows, batch_body, (pr, codes, jnp.int32(0)))
    return codes, f0, changed


def _objective(target, sigma, grid, scale_rows, codes):
    r = target - dequantize_codes(codes, grid, scale_rows, 1)
    return jnp.sum(r * _mm(sigma, r))


def _power_lambda(sigma, iters=100):
    k = sigma.shape[0]
    v = jax.random.normal(jax.random.key(0), (k,), jnp.float32)
    v = v / jnp.linalg.norm(v)

    def body(_, v):
        y = _mm(sigma, v)
        return y / jnp.maximum(jnp.linalg.norm(y), 1e-30)

    v = lax.fori_loop(0, iters, body, v)
    return jnp.linalg.norm(_mm(sigma, v))


def _hard_threshold(x, k):
    flat = x.reshape(-1)
    _, idx = lax.top_k(jnp.abs(flat), k)
    return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(x.shape)


def monotone_iht(s_mat, e, pe, f, lam, sigma, *, k, steps):
    """`steps` iterative-hard-thresholding steps on the sparse part S of f = tr(E^T Sigma E).

    E = W_hat + S - W is carried as `e` with `pe` = Sigma E and `f` = f(E). Each step projects
    S - (Sigma E) / lam onto its k largest entries and is kept only if f does not increase; lam
    (1/step) doubles on a real increase. Returns (S, E, Sigma E, f, lam).
    """

    def step(_, c):
        s_mat, e, pe, f, lam = c
        cand = _hard_threshold(s_mat - pe / lam, k)
        e_new = e + (cand - s_mat)
        pe_new = _mm(sigma, e_new)
        f_new = jnp.sum(e_new * pe_new)
        ok = f_new <= f
        pick = lambda a, b: jnp.where(ok, a, b)
        # Grow lambda only on a real increase, not on a float-rounding tie near convergence.
        grow = f_new > f * (1.0 + 1e-5)
        return (
            pick(cand, s_mat),
            pick(e_new, e),
            pick(pe_new, pe),
            pick(f_new, f),
            jnp.where(grow, 2.0 * lam, lam),
        )

    return lax.fori_loop(0, steps, step, (s_mat, e, pe, f, lam))


@functools.partial(
    jax.jit,
    static_argnames=("p", "group_size", "num_sweeps", "num_outliers", "outlier_iters", "iht_steps"),
)
def _quantease_core(
    w,
    sigma,
    grid,
    scales,
    codes,
    *,
    p,
    group_size,
    num_sweeps,
    num_outliers,
    outlier_iters,
    iht_steps,
):
    w = w.astype(jnp.float32)
    sigma = 0.5 * (sigma.astype(jnp.float32) + sigma.astype(jnp.float32).T)
    grid = grid.astype(jnp.float32)
    scale_rows = jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)  # (K, N)
    qd_all = _grid_quadratic_forms(sigma, grid, p)

    def plain(i, c):
        codes, hist, chg = c
        codes, f0, ch = _sweep(w, sigma, grid, scale_rows, codes, qd_all, p=p)
        return codes, hist.at[i].set(f0), chg.at[i].set(ch)

    n_hist = 1 + num_sweeps + 2 * outlier_iters
    hist = jnp.zeros((n_hist,), jnp.float32)
    chg = jnp.zeros((num_sweeps + outlier_iters,), jnp.int32)
    if num_sweeps:  # (a zero-trip fori_loop still traces its body, which would index empty arrays)
        codes, hist, chg = lax.fori_loop(0, num_sweeps, plain, (codes, hist, chg))
    f_plain = _objective(w, sigma, grid, scale_rows, codes)
    hist = hist.at[num_sweeps].set(f_plain)
    if num_outliers == 0:
        return codes, None, hist, chg, None

    lam0 = _power_lambda(sigma) * 1.01

    def round_body(i, c):
        codes, s_mat, lam, hist, chg = c
        e = dequantize_codes(codes, grid, scale_rows, 1) + s_mat - w
        pe = _mm(sigma, e)
        f = jnp.sum(e * pe)
        s_mat, _, _, f, lam = monotone_iht(s_mat, e, pe, f, lam, sigma, k=num_outliers,
                                           steps=iht_steps)
        hist = hist.at[num_sweeps + 1 + 2 * i].set(f)
        codes, _, ch = _sweep(w - s_mat, sigma, grid, scale_rows, codes, qd_all, p=p)
        f2 = _objective(w - s_mat, sigma, grid, scale_rows, codes)
        hist = hist.at[num_sweeps + 2 + 2 * i].set(f2)
        return codes, s_mat, lam, hist, chg.at[num_sweeps + i].set(ch)

    s0 = jnp.zeros_like(w)
    codes, s_mat, lam, hist, chg = lax.fori_loop(
        0, outlier_iters, round_body, (codes, s0, lam0, hist, chg)
    )
    # The final S keeps exactly num_outliers positions (top-k of |S|: S is k-sparse already, so
    # ties only occur among zeros, which are legitimate zero-valued outliers).
    _, idx = lax.top_k(jnp.abs(s_mat.reshape(-1)), num_outliers)
    idx = jnp.sort(idx).astype(jnp.int32)
    vals = s_mat.reshape(-1)[idx]
    return codes, (idx, vals), hist, chg, lam


def _check_int(name, value, minimum):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def quantease_quantize(
    w: jax.Array,
    sigma: jax.Array,
    *,
    grid: jax.Array,
    scales: jax.Array,
    group_size: int,
    num_sweeps: int = 20,
    init_codes: jax.Array | None = None,
    outlier_fraction: float | None = None,
    outlier_iters: int = 10,
    iht_steps: int = 5,
    return_history: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, QuantEaseInfo]:
    """QuantEase: cyclic coordinate descent on tr(E^T Sigma E) with a fixed grid and fixed scales.

    Args:
      w: ``(K, N)`` kernel (rotated domain for HIGGS; plain for RTN/NF4 scalar grids).
      sigma: ``(K, K)`` input second moment in the same domain.
      grid: ``(n, p)`` grid points.
      scales: ``(K / group_size, N)`` fixed scales.
      group_size: rows per scale group (multiple of p, divides K).
      num_sweeps: plain coordinate-descent sweeps over K.
      init_codes: ``(K / p, N)`` int warm start (data-free or GPTQ codes); default: nearest rounding.
      outlier_fraction: None for plain QuantEase; else the fraction of entries kept as full-precision
        outliers, in (0, 0.5) (0.01 is the usual choice).
      outlier_iters: rounds of (IHT steps, one sweep) after the plain sweeps (outliers only).
      iht_steps: iterative-hard-thresholding steps per round (outliers only).
      return_history: record the objective after every step and the codes changed per sweep.

    Returns:
      ``(codes, outliers, info)``: int32 codes ``(K / p, N)``; outliers None or
      ``(indices, values)`` with ``k = round(outlier_fraction * K * N)`` unique int32 flat row-major
      indices into ``(K, N)`` (sorted) and their float32 values, to be added to the dequantized
      weight; a `QuantEaseInfo`.

    Raises:
      ValueError: inconsistent shapes, bad schedule values, init codes out of range, or an
        outlier fraction outside (0, 0.5).
    """
    k, n_cols, n, p = _validate_problem(w, sigma, grid, scales, group_size)
    _check_int("num_sweeps", num_sweeps, 0)
    _check_int("outlier_iters", outlier_iters, 1)
    _check_int("iht_steps", iht_steps, 1)
    num_outliers = 0
    if outlier_fraction is not None:
        if (
            not isinstance(outlier_fraction, (int, float, np.floating, np.integer))
            or isinstance(outlier_fraction, bool)
            or not math.isfinite(outlier_fraction)
            or not 0.0 < outlier_fraction < 0.5
        ):
            raise ValueError(
                f"outlier_fraction must be a number in (0, 0.5), got {outlier_fraction!r}"
            )
        num_outliers = round(outlier_fraction * k * n_cols)
    w = jnp.asarray(w, jnp.float32)
    grid = jnp.asarray(grid, jnp.float32)
    scales = jnp.asarray(scales, jnp.float32)
    if init_codes is None:
        scale_rows = jnp.repeat(scales, group_size, axis=0)
        safe = jnp.where(scale_rows == 0, 1.0, scale_rows)
        init_codes = nearest_grid_code(
            (w / safe).reshape(k // p, p, n_cols).transpose(0, 2, 1), grid
        )
    else:
        if getattr(init_codes, "shape", None) != (k // p, n_cols):
            raise ValueError(
                f"init_codes must have shape (K/p, N) = {(k // p, n_cols)}, got {getattr(init_codes, 'shape', None)}"
            )
        if not jnp.issubdtype(jnp.asarray(init_codes).dtype, jnp.integer):
            raise ValueError(
                f"init_codes must be integers, got dtype {jnp.asarray(init_codes).dtype}"
            )
        if _is_concrete(init_codes):
            lo, hi = int(jnp.min(init_codes)), int(jnp.max(init_codes))
            if lo < 0 or hi >= n:
                raise ValueError(f"init_codes must lie in [0, n={n}), got range [{lo}, {hi}]")
        init_codes = jnp.asarray(init_codes, jnp.int32)
    n_iters = outlier_iters if num_outliers else 0
    codes, outliers, hist, chg, lam = _quantease_core(
        w,
        jnp.asarray(sigma),
        grid,
        scales,
        init_codes,
        p=p,
        group_size=int(group_size),
        num_sweeps=int(num_sweeps),
        num_outliers=num_outliers,
        outlier_iters=n_iters,
        iht_steps=int(iht_steps) if num_outliers else 0,
    )
    if outlier_fraction is not None and num_outliers == 0:
        outliers = (jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32))
    last = hist[num_sweeps + 2 * n_iters]
    if return_history:
        n_sweeps_total = num_sweeps + n_iters
        history, changed = hist, chg[:n_sweeps_total]
    else:
        history = changed = None
    # hist[0] is the warm start's objective, except with num_sweeps == 0 where it is f after 0 sweeps.
    info = QuantEaseInfo(
        num_sweeps=int(num_sweeps),
        outlier_iters=n_iters,
        iht_steps=int(iht_steps) if num_outliers else 0,
        num_outliers=num_outliers,
        initial_objective=hist[0],
        objective=last,
        history=history,
        changed=changed,
        outlier_lambda=lam,
    )
    return codes, outliers, info
