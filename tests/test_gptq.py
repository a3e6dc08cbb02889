"""GPTQ with a fixed grid and fixed scales (higgs_jax.datawise.gptq).

Objective everywhere: tr(E^T Sigma E), E = W_hat - W, Sigma = X^T X (Flax (K, N) convention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax.datawise import dequantize_codes, gptq_quantize, hessian_objective, nearest_grid_code

K, N, G = 128, 32, 32
LLOYD4 = np.array([[-1.5104], [-0.4528], [0.4528], [1.5104]], np.float32)


@functools.cache
def kmeans_grid(n: int, p: int, seed: int = 0) -> np.ndarray:
    """A Lloyd (k-means) grid for N(0, I_p) built from samples (MSE-optimal-like)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((20000, p))
    c = x[rng.choice(len(x), n, replace=False)]
    for _ in range(30):
        a = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        for j in range(n):
            if np.any(a == j):
                c[j] = x[a == j].mean(0)
    return c.astype(np.float32)


def make_grid(name: str) -> np.ndarray:
    if name == "lloyd4_p1":
        return LLOYD4
    if name == "int_p1":  # symmetric uniform int grid -7..7 (absmax scaling)
        return np.arange(-7, 8, dtype=np.float32)[:, None]
    if name == "kmeans16_p2":
        return kmeans_grid(16, 2)
    if name == "kmeans64_p2":
        return kmeans_grid(64, 2)
    raise KeyError(name)


GRIDS = ["lloyd4_p1", "int_p1", "kmeans16_p2", "kmeans64_p2"]
SIGMAS = ["outliers", "rank_deficient", "ill_conditioned"]


def make_sigma(kind: str, k: int = K, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "outliers":  # a few large-norm input channels, as in real activations
        x = rng.standard_normal((4 * k, k))
        x[:, rng.choice(k, 4, replace=False)] *= 25.0
    elif kind == "rank_deficient":  # fewer samples than inputs, plus dead inputs
        x = rng.standard_normal((k // 3, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
        x[:, :3] = 0.0
    elif kind == "ill_conditioned":
        q, _ = np.linalg.qr(rng.standard_normal((k, k)))
        return ((q * np.logspace(0, -7, k)) @ q.T * 1e3).astype(np.float32)
    else:
        raise KeyError(kind)
    return (x.T @ x).astype(np.float32)


def make_problem(
    grid_name: str, sigma_kind: str, k: int = K, n: int = N, g: int = G, seed: int = 0
):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.5, 2.0, (1, n)).astype(
        np.float32
    )
    grid = make_grid(grid_name)
    blocks = w.reshape(k // g, g, n)
    if grid_name == "int_p1":
        scales = np.abs(blocks).max(1) / 7.0
    else:
        scales = np.sqrt((blocks**2).mean(1))
    return w, make_sigma(sigma_kind, k), grid, scales.astype(np.float32)


def rounding_codes(w, grid, scales, g):
    k, n = w.shape
    p = grid.shape[1]
    sr = np.repeat(scales, g, axis=0)
    v = (w / sr).reshape(k // p, p, n).transpose(0, 2, 1)
    return nearest_grid_code(jnp.asarray(v), jnp.asarray(grid))


def objective(codes, w, sigma, grid, scales, g):
    return float(hessian_objective(dequantize_codes(codes, grid, scales, g), w, sigma))


def reference_gptq(w, sigma, grid, scales, g, damp=0.01, assignment="euclidean"):
    """Textbook OBS/GPTQ in float64 without Cholesky or lazy batches: after fixing p-block B to q,
    the remaining rows F move by -inv(H_F)[:, B] inv(inv(H_F)[B, B]) (W_B - q), which costs
    (W_B - q)^T inv(inv(H_F)[B, B]) (W_B - q) (the "hessian" assignment minimises that)."""
    k, n = w.shape
    p = grid.shape[1]
    h = sigma.astype(np.float64).copy()
    h[np.diag_indices(k)] += np.diag(h) == 0  # dead inputs -> 1, as GPTQ does
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    wc = w.astype(np.float64).copy()
    sr = np.repeat(scales, g, axis=0).astype(np.float64)
    codes = np.zeros((k // p, n), np.int64)
    gr = grid.astype(np.float64)
    for j in range(k // p):
        b = slice(j * p, (j + 1) * p)
        hinv = np.linalg.inv(h[j * p :, j * p :])
        m = np.linalg.inv(hinv[:p, :p]) if assignment == "hessian" else np.eye(p)
        d = wc[b].T[:, None, :] - gr[None] * sr[b].T[:, None, :]  # (N, n, p) = v - q
        c = np.argmin(np.einsum("cnp,pq,cnq->cn", d, m, d), axis=1)
        codes[j] = c
        q = gr[c].T * sr[b]
        delta = -hinv[:, :p] @ np.linalg.solve(hinv[:p, :p], wc[b] - q)
        wc[j * p :] += delta
    return codes


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("sigma_kind", SIGMAS)
def test_gptq_not_worse_than_rounding(sigma_kind, grid_name):
    w, sigma, grid, scales = make_problem(grid_name, sigma_kind)
    codes, info = gptq_quantize(w, sigma, grid=grid, scales=scales, group_size=G)
    assert codes.shape == (K // grid.shape[1], N) and codes.dtype == jnp.int32
    obj = objective(codes, w, sigma, grid, scales, G)
    obj_rtn = objective(rounding_codes(w, grid, scales, G), w, sigma, grid, scales, G)
    assert np.isfinite(obj)
    np.testing.assert_allclose(float(info.objective), obj, rtol=1e-4)
    np.testing.assert_allclose(float(info.rounding_objective), obj_rtn, rtol=1e-4)
    assert obj <= obj_rtn
    if sigma_kind == "outliers":  # the data-aware gain is large, not marginal
        assert obj < 0.95 * obj_rtn


@pytest.mark.parametrize(
    "grid_name,assignment", [(g, "hessian") for g in GRIDS] + [("kmeans16_p2", "euclidean")]
)
@pytest.mark.parametrize("scale", [1.0, 37.5])
def test_gptq_identity_sigma_equals_rounding(grid_name, scale, assignment):
    w, _, grid, scales = make_problem(grid_name, "outliers")
    sigma = np.eye(K, dtype=np.float32) * scale
    codes, _ = gptq_quantize(
        w, sigma, grid=grid, scales=scales, group_size=G, assignment=assignment
    )
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(rounding_codes(w, grid, scales, G)))


@pytest.mark.parametrize(
    "grid_name,assignment",
    [("lloyd4_p1", "hessian"), ("kmeans16_p2", "euclidean"), ("kmeans16_p2", "hessian")],
)
@pytest.mark.parametrize("sigma_kind", ["outliers", "rank_deficient"])
def test_gptq_matches_textbook_obs(sigma_kind, grid_name, assignment):
    w, sigma, grid, scales = make_problem(grid_name, sigma_kind)
    codes, _ = gptq_quantize(
        w, sigma, grid=grid, scales=scales, group_size=G, assignment=assignment
    )
    ref = reference_gptq(w, sigma, grid, scales, G, assignment=assignment)
    # Identical up to rare float32 near-ties, which then change the path of the column.
    assert np.mean(np.asarray(codes) == ref) >= 0.99


@pytest.mark.parametrize("grid_name", ["lloyd4_p1", "kmeans16_p2"])
def test_gptq_lazy_block_size_invariance(grid_name):
    # K = 128 is not a multiple of 48: exercises the padded last lazy batch.
    w, sigma, grid, scales = make_problem(grid_name, "outliers")
    c_small, i_small = gptq_quantize(
        w, sigma, grid=grid, scales=scales, group_size=G, block_size=48
    )
    c_big, i_big = gptq_quantize(w, sigma, grid=grid, scales=scales, group_size=G)
    assert np.mean(np.asarray(c_small) == np.asarray(c_big)) >= 0.99
    np.testing.assert_allclose(float(i_small.objective), float(i_big.objective), rtol=1e-3)


def test_gptq_singular_sigma_is_dampened_and_reported():
    w, sigma, grid, scales = make_problem("lloyd4_p1", "rank_deficient")
    assert np.linalg.matrix_rank(sigma.astype(np.float64)) < K
    codes, info = gptq_quantize(w, sigma, grid=grid, scales=scales, group_size=G)
    assert int(info.num_dead_inputs) == 3
    assert info.damp == 0.01 and float(info.damp_added) > 0
    assert np.isfinite(float(info.objective))
    assert float(info.objective) <= float(info.rounding_objective)
    # Dead inputs do not interact with anything: they are plain nearest rounding.
    np.testing.assert_array_equal(
        np.asarray(codes)[:3], np.asarray(rounding_codes(w, grid, scales, G))[:3]
    )


def test_gptq_undampened_singular_sigma_raises():
    w, sigma, grid, scales = make_problem("lloyd4_p1", "rank_deficient")
    with pytest.raises(ValueError, match="damp=0"):
        gptq_quantize(w, sigma, grid=grid, scales=scales, group_size=G, damp=0.0)


def test_gptq_under_jit():
    w, sigma, grid, scales = make_problem("kmeans16_p2", "outliers")
    fn = jax.jit(lambda w, s, gr, sc: gptq_quantize(w, s, grid=gr, scales=sc, group_size=G))
    codes, info = fn(w, sigma, grid, scales)
    codes2, _ = gptq_quantize(w, sigma, grid=grid, scales=scales, group_size=G)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(codes2))
    assert float(info.objective) <= float(info.rounding_objective)


def _bad(case):
    w, sigma, grid, scales = make_problem("kmeans16_p2", "outliers")
    kw = {"grid": grid, "scales": scales, "group_size": G}
    if case == "sigma_shape":
        return (w, sigma[:-1, :-1]), kw, r"\(127, 127\)"
    if case == "w_1d":
        return (w[:, 0], sigma), kw, r"\(128,\)"
    if case == "scales_shape":
        return (w, sigma), {**kw, "scales": scales[:, :-1]}, r"\(4, 31\)"
    if case == "grid_1d":
        return (w, sigma), {**kw, "grid": grid[:, 0]}, r"\(16,\)"
    if case == "p_not_dividing_k":
        g3 = np.zeros((4, 3), np.float32)
        return (w, sigma), {**kw, "grid": g3}, "p=3"
    if case == "p_not_dividing_group":
        w2, s2 = w[:126], sigma[:126, :126]
        return (
            (w2, s2),
            {**kw, "group_size": 21, "scales": np.ones((6, N), np.float32)},
            "group_size=21",
        )
    if case == "group_not_dividing_k":
        return (w, sigma), {**kw, "group_size": 48}, "group_size=48"
    if case == "damp_negative":
        return (w, sigma), {**kw, "damp": -0.1}, r"-0\.1"
    if case == "damp_nan":
        return (w, sigma), {**kw, "damp": float("nan")}, "nan"
    if case == "assignment":
        return (w, sigma), {**kw, "assignment": "nearest"}, "'nearest'"
    if case == "block_not_multiple_of_p":
        return (w, sigma), {**kw, "block_size": 33}, "block_size=33"
    if case == "nonfinite_w":
        w2 = w.copy()
        w2[0, 0] = np.inf
        return (w2, sigma), kw, "w contains non-finite"
    raise KeyError(case)


@pytest.mark.parametrize(
    "case",
    [
        "sigma_shape",
        "w_1d",
        "scales_shape",
        "grid_1d",
        "p_not_dividing_k",
        "p_not_dividing_group",
        "group_not_dividing_k",
        "damp_negative",
        "damp_nan",
        "block_not_multiple_of_p",
        "nonfinite_w",
        "assignment",
    ],
)
def test_gptq_bad_input(case):
    args, kw, msg = _bad(case)
    with pytest.raises(ValueError, match=msg):
        gptq_quantize(*args, **kw)
