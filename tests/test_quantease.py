"""QuantEase block coordinate descent and its outlier-aware variant (higgs_jax.datawise.quantease).

Objective: f = tr(E^T Sigma E), E = W_hat (+ S) - W. Problems and grids are shared with test_gptq.
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from test_gptq import GRIDS, SIGMAS, G, K, N, make_problem, objective, rounding_codes

from higgs_jax.datawise import (
    dequantize_codes,
    gptq_quantize,
    hessian_objective,
    quantease_quantize,
)

SWEEPS = 8
RTOL = 1e-5  # float32 rounding in the recomputed objective


def full_objective(codes, outliers, w, sigma, grid, scales, g=G):
    w_hat = np.asarray(dequantize_codes(codes, grid, scales, g)).astype(np.float64)
    if outliers is not None:
        idx, vals = (np.asarray(a) for a in outliers)
        w_hat.reshape(-1)[idx] += vals
    e = w_hat - w.astype(np.float64)
    return float(np.sum(e * (sigma.astype(np.float64) @ e)))


def assert_non_increasing(h):
    h = np.asarray(h, np.float64)
    assert np.all(np.diff(h) <= RTOL * np.abs(h[:-1])), h


@pytest.mark.parametrize("warm", ["rounding", "gptq"])
@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("sigma_kind", ["outliers", "ill_conditioned"])
def test_quantease_monotone_and_not_worse_than_warm_start(sigma_kind, grid_name, warm):
    w, sigma, grid, scales = make_problem(grid_name, sigma_kind)
    if warm == "gptq":
        init, ginfo = gptq_quantize(w, sigma, grid=grid, scales=scales, group_size=G)
        f_init = float(ginfo.objective)
    else:
        init = rounding_codes(w, grid, scales, G)
        f_init = objective(init, w, sigma, grid, scales, G)
    codes, outliers, info = quantease_quantize(
        w,
        sigma,
        grid=grid,
        scales=scales,
        group_size=G,
        num_sweeps=SWEEPS,
        init_codes=init,
        return_history=True,
    )
    assert outliers is None
    assert codes.shape == init.shape and codes.dtype == jnp.int32
    hist = np.asarray(info.history)
    assert hist.shape == (SWEEPS + 1,)
    np.testing.assert_allclose(hist[0], f_init, rtol=1e-4)
    assert_non_increasing(hist)
    f = full_objective(codes, None, w, sigma, grid, scales)
    np.testing.assert_allclose(float(info.objective), f, rtol=1e-4)
    assert f <= f_init * (1 + RTOL)
    if warm == "rounding" and sigma_kind == "outliers":
        assert f < 0.95 * f_init  # it really moves
    assert np.asarray(info.changed).shape == (SWEEPS,)


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("sigma_kind", SIGMAS)
def test_quantease_vs_gptq(sigma_kind, grid_name):
    """Guaranteed: QuantEase warm-started from GPTQ <= GPTQ. Reported: QuantEase from rounding vs GPTQ."""
    w, sigma, grid, scales = make_problem(grid_name, sigma_kind)
    g_codes, ginfo = gptq_quantize(w, sigma, grid=grid, scales=scales, group_size=G)
    _, _, qinfo_g = quantease_quantize(
        w, sigma, grid=grid, scales=scales, group_size=G, num_sweeps=SWEEPS, init_codes=g_codes
    )
    _, _, qinfo_r = quantease_quantize(
        w, sigma, grid=grid, scales=scales, group_size=G, num_sweeps=SWEEPS
    )
    f_g, f_qg, f_qr = float(ginfo.objective), float(qinfo_g.objective), float(qinfo_r.objective)
    print(
        f"{sigma_kind} {grid_name}: QE(rounding)/GPTQ = {f_qr / f_g:.4f}, QE(GPTQ)/GPTQ = {f_qg / f_g:.4f}"
    )
    assert f_qg <= f_g * (1 + RTOL)


def literal_quantease(w, sigma, grid, scales, g, codes, sweeps):
    """SPEC §5 written out in float64, one block at a time, with no maintained products:
    u_B = W_B + Sigma_BB^{-1} sum_{k not in B} Sigma_Bk (W_k - W_hat_k) (for p = 1:
    u_j = W_j + sum_{k != j} (W_k - W_hat_k) Sigma_kj / Sigma_jj), then the grid point s * g_m
    minimising (s g_m - u_B)^T Sigma_BB (s g_m - u_B) (for p = 1: nearest(u_j / s))."""
    k = w.shape[0]
    p = grid.shape[1]
    w = w.astype(np.float64)
    sig = sigma.astype(np.float64)
    gr = grid.astype(np.float64)
    sr = np.repeat(scales, g, axis=0).astype(np.float64)
    codes = np.asarray(codes).copy()
    r = w - np.asarray(dequantize_codes(codes, grid, scales, g), np.float64)
    for _ in range(sweeps):
        for j in range(k // p):
            b = slice(j * p, (j + 1) * p)
            a = sig[b, b]
            u = w[b] + np.linalg.solve(a, sig[b] @ r - a @ r[b])  # (p, N)
            d = gr[None, :, :] * sr[b].T[:, None, :] - u.T[:, None, :]  # (N, n, p)
            codes[j] = np.argmin(np.einsum("cnp,pq,cnq->cn", d, a, d), axis=1)
            r[b] = w[b] - gr[codes[j]].T * sr[b]
    return codes


@pytest.mark.parametrize(
    "grid_name,k",
    [
        ("lloyd4_p1", 128),
        ("int_p1", 128),
        ("kmeans16_p2", 128),
        ("int_p1", 384),
        ("kmeans16_p2", 384),
    ],
)
def test_quantease_is_the_literal_update(grid_name, k):
    """K = 384 spans three lazy batches of 128 rows."""
    w, sigma, grid, scales = make_problem(grid_name, "outliers", k=k)
    init = rounding_codes(w, grid, scales, G)
    sweeps = SWEEPS if k == K else 2
    codes, _, _ = quantease_quantize(
        w, sigma, grid=grid, scales=scales, group_size=G, num_sweeps=sweeps, init_codes=init
    )
    ref = literal_quantease(w, sigma, grid, scales, G, init, sweeps)
    assert np.mean(np.asarray(codes) == ref) >= 0.99


@pytest.mark.parametrize("grid_name", ["kmeans16_p2", "kmeans64_p2"])
def test_quantease_fixed_point_is_blockwise_optimal(grid_name):
    """After convergence, no single p-block of one column can be changed to any grid point to lower f."""
    w, sigma, grid, scales = make_problem(grid_name, "outliers")
    codes = None
    for _ in range(5):  # chained warm starts (one compiled schedule) until a sweep changes nothing
        codes, _, info = quantease_quantize(
            w,
            sigma,
            grid=grid,
            scales=scales,
            group_size=G,
            num_sweeps=SWEEPS,
            init_codes=codes,
            return_history=True,
        )
        if int(np.asarray(info.changed)[-1]) == 0:
            break
    assert int(np.asarray(info.changed)[-1]) == 0  # converged
    codes = np.asarray(codes)
    p = grid.shape[1]
    w64, sig = w.astype(np.float64), sigma.astype(np.float64)
    sr = np.repeat(scales, G, axis=0).astype(np.float64)
    r = w64 - np.asarray(dequantize_codes(codes, grid, scales, G), np.float64)
    rng = np.random.default_rng(3)
    for j, c in zip(rng.choice(K // p, 6), rng.choice(N, 6)):
        rows = slice(j * p, (j + 1) * p)
        cur = r[:, c]
        base = cur @ sig @ cur
        for m in range(grid.shape[0]):
            alt = cur.copy()
            alt[rows] = w64[rows, c] - grid[m].astype(np.float64) * sr[rows, c]
            assert alt @ sig @ alt >= base * (1 - 1e-5)


@pytest.mark.parametrize("grid_name,fraction", [("lloyd4_p1", 0.05), ("kmeans16_p2", 0.01)])
@pytest.mark.parametrize("sigma_kind", ["outliers", "rank_deficient"])
def test_outliers_not_worse_than_plain(sigma_kind, grid_name, fraction):
    w, sigma, grid, scales = make_problem(grid_name, sigma_kind)
    kw = {"grid": grid, "scales": scales, "group_size": G, "num_sweeps": SWEEPS}
    _, _, plain = quantease_quantize(w, sigma, **kw)
    codes, outliers, info = quantease_quantize(
        w, sigma, **kw, outlier_fraction=fraction, outlier_iters=4, return_history=True
    )
    idx, vals = (np.asarray(a) for a in outliers)
    k = round(fraction * K * N)
    assert info.num_outliers == k and idx.shape == (k,) and vals.shape == (k,)
    assert idx.dtype == np.int32 and vals.dtype == np.float32
    assert len(np.unique(idx)) == k and idx.min() >= 0 and idx.max() < K * N
    assert np.all(np.diff(idx) > 0)  # sorted
    assert_non_increasing(info.history)
    assert info.history.shape == (1 + SWEEPS + 2 * 4,)
    f = full_objective(codes, outliers, w, sigma, grid, scales)
    np.testing.assert_allclose(float(info.objective), f, rtol=1e-3)
    assert f <= float(plain.objective) * (1 + RTOL)
    if sigma_kind == "outliers":
        assert f < 0.9 * float(plain.objective)  # outliers on heavy channels pay off


def test_outlier_count_rounds_and_can_be_zero():
    w, sigma, grid, scales = make_problem("lloyd4_p1", "outliers")
    _codes, outliers, info = quantease_quantize(
        w, sigma, grid=grid, scales=scales, group_size=G, num_sweeps=SWEEPS, outlier_fraction=1e-5
    )
    assert round(1e-5 * K * N) == 0
    assert outliers[0].shape == (0,) and outliers[1].shape == (0,) and info.num_outliers == 0


def test_zero_sweeps_returns_warm_start():
    w, sigma, grid, scales = make_problem("kmeans16_p2", "outliers")
    init = rounding_codes(w, grid, scales, G)
    codes, _, info = quantease_quantize(
        w, sigma, grid=grid, scales=scales, group_size=G, num_sweeps=0, init_codes=init
    )
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(init))
    np.testing.assert_allclose(
        float(info.objective), objective(init, w, sigma, grid, scales, G), rtol=1e-4
    )


@pytest.mark.parametrize("fraction", [0, 0.0, 0.5, -1, float("nan"), float("inf"), 0.7])
def test_bad_outlier_fraction(fraction):
    w, sigma, grid, scales = make_problem("lloyd4_p1", "outliers")
    with pytest.raises(ValueError, match=re.escape(repr(fraction))):
        quantease_quantize(
            w, sigma, grid=grid, scales=scales, group_size=G, outlier_fraction=fraction
        )


@pytest.mark.parametrize(
    "case,msg",
    [
        ("sigma_shape", r"\(64, 64\)"),
        ("scales_shape", r"\(2, 32\)"),
        ("p_not_dividing_k", "p=3"),
        ("group_not_dividing_k", "group_size=48"),
        ("init_shape", r"\(64, 31\)"),
        ("init_range", r"\[16, 31\]"),
        ("init_float", "float32"),
        ("sweeps_negative", "-1"),
        ("iters_zero", "outlier_iters"),
    ],
)
def test_bad_input(case, msg):
    w, sigma, grid, scales = make_problem("kmeans16_p2", "outliers")
    kw = {"grid": grid, "scales": scales, "group_size": G}
    args = (w, sigma)
    init = np.asarray(rounding_codes(w, grid, scales, G))
    if case == "sigma_shape":
        args = (w, sigma[:64, :64])
    elif case == "scales_shape":
        kw["scales"] = scales[:2]
    elif case == "p_not_dividing_k":
        kw["grid"] = np.zeros((8, 3), np.float32)
    elif case == "group_not_dividing_k":
        kw["group_size"] = 48
    elif case == "init_shape":
        kw["init_codes"] = init[:, :31]
    elif case == "init_range":
        kw["init_codes"] = init + 16
    elif case == "init_float":
        kw["init_codes"] = init.astype(np.float32)
    elif case == "sweeps_negative":
        kw["num_sweeps"] = -1
    elif case == "iters_zero":
        kw["outlier_iters"] = 0
    with pytest.raises(ValueError, match=msg):
        quantease_quantize(*args, **kw)


def test_objective_helper_matches_numpy():
    w, sigma, grid, scales = make_problem("lloyd4_p1", "outliers")
    w_hat = np.asarray(dequantize_codes(rounding_codes(w, grid, scales, G), grid, scales, G))
    e = (w_hat - w).astype(np.float64)
    expect = np.trace(e.T @ sigma.astype(np.float64) @ e)
    assert math.isclose(float(hessian_objective(w_hat, w, sigma)), expect, rel_tol=1e-4)
