"""Grids: shipped Gaussian grids are near-optimal quantizers of N(0, I_p); nearest_code is exact."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax import grids
from higgs_jax.grids import GridSpec

SHIPPED = grids.available_grids()
REQUIRED = [(1, 4), (1, 8), (1, 16), (1, 64), (1, 256), (2, 4), (2, 8), (2, 16), (2, 64),
            (2, 256), (3, 64), (3, 512), (3, 4096), (4, 256), (4, 4096)]  # fmt: skip
ALL_SPECS = [grids.gauss_grid(p, n) for p, n in SHIPPED] + [
    GridSpec("nf4", 1, 16),
    GridSpec("int", 1, 4),
    GridSpec("int", 1, 16),
    GridSpec("int", 1, 256),
]


def _ids(specs):
    return [f"{s.kind}-p{s.p}-n{s.n}" for s in specs]


def _brute_force(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    x, g = x.astype(np.float64), g.astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2.0 * x @ g.T + (g * g).sum(1)[None, :]
    return np.argmin(d, axis=1)


def _mc_rel_tol(samples: int, p: int) -> float:
    # 5 sigma of a Monte-Carlo mean of per-vector squared errors. Their coefficient of variation
    # is large for scalar grids (measured 2.6 for n=8, 3.3 for n=16: the tail cells are wide) and
    # about 1-1.4 for p >= 2.
    cv = 3.5 if p == 1 else 1.5
    return 5.0 * cv / math.sqrt(samples)


def test_required_grids_are_shipped():
    assert set(REQUIRED) <= set(SHIPPED)


@pytest.mark.parametrize("p,n", SHIPPED)
def test_file_shape_dtype_and_readonly(p, n):
    g = grids.grid_values(grids.gauss_grid(p, n))
    assert g.shape == (n, p) and g.dtype == np.float32
    assert np.all(np.isfinite(g))
    assert not g.flags.writeable
    assert len(np.unique(g, axis=0)) == n  # no duplicate points
    # Canonical lexicographic order (first coordinate is the primary key).
    order = np.lexsort(g.T[::-1])
    np.testing.assert_array_equal(order, np.arange(n))
    # Cached: same object on every call.
    assert grids.grid_values(grids.gauss_grid(p, n)) is g


@pytest.mark.parametrize("p,n", SHIPPED)
def test_grid_is_centred(p, n):
    g = grids.grid_values(grids.gauss_grid(p, n)).astype(np.float64)
    # N(0, I) is symmetric, so an optimal grid's mean is ~0. (Per-axis spreads need not be equal:
    # N(0, I) is rotation invariant, so a rotated optimal grid is optimal too.)
    assert np.all(np.abs(g.mean(0)) < 0.05)


@pytest.mark.parametrize("p,n", [pn for pn in SHIPPED if pn[0] == 1])
def test_scalar_grids_are_exactly_symmetric(p, n):
    lv = grids.grid_values(grids.gauss_grid(p, n))[:, 0]
    np.testing.assert_allclose(lv, -lv[::-1], atol=1e-6)


def test_lloyd_max_levels_match_spec():
    g4 = grids.grid_values(grids.gauss_grid(1, 4))[:, 0]
    np.testing.assert_allclose(g4, [-1.5104, -0.4528, 0.4528, 1.5104], atol=2e-4)
    g8 = grids.grid_values(grids.gauss_grid(1, 8))[:, 0]
    np.testing.assert_allclose(g8[4:], [0.2451, 0.7560, 1.3439, 2.1520], atol=2e-4)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=_ids(ALL_SPECS))
def test_grid_points_map_to_themselves(spec):
    g = grids.grid_values(spec)
    codes = np.asarray(grids.nearest_code(jnp.asarray(g), spec))
    if spec.kind == "int":
        # The unused padding code n-1 duplicates level 0, which keeps its own (lower) code.
        np.testing.assert_array_equal(codes[:-1], np.arange(spec.n - 1))
        assert codes[-1] == spec.n // 2 - 1
    else:
        np.testing.assert_array_equal(codes, np.arange(spec.n))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=_ids(ALL_SPECS))
def test_nearest_code_matches_brute_force(spec):
    g = grids.grid_values(spec)
    scale = 1.0 if spec.kind == "gauss" else float(np.abs(g).max()) / 2
    x = np.asarray(jax.random.normal(jax.random.key(spec.n + spec.p), (2000, spec.p))) * scale
    x[:50] *= 6.0  # far outside the grid too
    codes = np.asarray(grids.nearest_code(jnp.asarray(x), spec))
    ref = _brute_force(x, g)
    # Equal codes, or (float32 rounding) an equally near point.
    d = lambda c: ((x - g[c]) ** 2).sum(-1)
    same = codes == ref
    np.testing.assert_allclose(d(codes)[~same], d(ref)[~same], rtol=1e-5, atol=1e-6)
    assert same.mean() > 0.999


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4), (0,)])
@pytest.mark.parametrize("p,n", [(1, 16), (2, 256), (4, 256)])
def test_nearest_code_batch_shapes_and_chunking(shape, p, n):
    spec = grids.gauss_grid(p, n)
    x = jax.random.normal(jax.random.key(1), (*shape, p))
    codes = grids.nearest_code(x, spec)
    assert codes.shape == shape and codes.dtype == jnp.int32
    flat = grids.nearest_code(x.reshape(-1, p), spec, chunk=3)  # ragged chunking
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), np.asarray(flat))
    jitted = jax.jit(lambda v: grids.nearest_code(v, spec))(x)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(codes))


@pytest.mark.parametrize("p,n", SHIPPED)
def test_recorded_mse_within_spec(p, n):
    # The manifest's MSE was measured at generation time on >= 2^22 fresh samples (relative MC
    # error <= 0.2%) drawn with a seed other than the training one.
    entry = grids.manifest_entry(p, n)
    assert entry["test_samples"] >= 1 << 22
    if p > 1:
        assert entry["test_seed"] != entry["train_seed"]
    else:  # Lloyd-Max: the exact MSE is known, and the Monte-Carlo estimate agrees with it.
        assert (
            abs(entry["mse"] - entry["exact_mse"])
            < _mc_rel_tol(entry["test_samples"], 1) * entry["mse"]
        )
    if (p, n) in grids.SPEC_GRID_MSE:  # at most 1.5% above the reference grids (lower is fine)
        assert entry["mse"] <= 1.015 * grids.SPEC_GRID_MSE[(p, n)]


@pytest.mark.parametrize("p,n", SHIPPED)
def test_measured_mse_matches_manifest_and_bounds(p, n):
    spec = grids.gauss_grid(p, n)
    samples = 1 << 20 if p == 1 else 1 << 18  # p = 1 is cheap and noisier
    mse = grids.grid_mse(spec, num_samples=samples, seed=12345)
    tol = _mc_rel_tol(samples, p)
    recorded = grids.manifest_entry(p, n)["mse"]
    assert abs(mse - recorded) < tol * recorded
    # Shannon's rate-distortion bound for N(0, 1) at b bits, and the Panter-Dite (high-rate
    # scalar) limit sqrt(3) pi / 2 * 4^-b = 2.72 * 4^-b, which every shipped grid beats (p >= 2)
    # or approaches from below (p = 1).
    assert 4.0 ** (-spec.bits) < recorded < 2.72 * 4.0 ** (-spec.bits)
    assert 4.0 ** (-spec.bits) < mse


@pytest.mark.parametrize(
    "p,n",
    [(p, n) for p, n in SHIPPED if p > 1 and (1, round(n ** (1 / p))) in SHIPPED
     and round(n ** (1 / p)) ** p == n],
)  # fmt: skip
def test_vector_grid_beats_product_of_scalar_grids(p, n):
    # The product of p Lloyd-Max grids with n^(1/p) levels is a p-dim grid with n points and the
    # same per-coordinate MSE, so an MSE-optimal p-dim grid must do at least as well (for n = 2^p
    # the product, a hypercube, is itself optimal: equality up to Monte-Carlo noise).
    m = round(n ** (1 / p))
    scalar = grids.manifest_entry(1, m)["exact_mse"]
    entry = grids.manifest_entry(p, n)
    assert entry["mse"] < scalar * (1 + _mc_rel_tol(entry["test_samples"], p))


def test_nf4_levels_match_spec():
    lv = grids.grid_values(GridSpec("nf4", 1, 16))
    assert lv.shape == (16, 1) and lv.dtype == np.float32
    np.testing.assert_allclose(lv[[0, 7, 15], 0], [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(lv[1, 0], -0.69619)
    np.testing.assert_allclose(lv[8, 0], 0.07958)
    assert np.all(np.diff(lv[:, 0]) > 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_levels(bits):
    spec = GridSpec("int", 1, 2**bits)
    lv = grids.grid_values(spec)[:, 0]
    q = 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(lv[:-1], np.arange(-q, q + 1))
    assert lv[-1] == 0 and np.abs(lv).max() == q
    assert spec.code_bits == bits and spec.bits == bits


def test_spec_properties():
    s = grids.gauss_grid(2, 256)
    assert s.bits == 4.0 and s.code_bits == 8
    assert hash(s) == hash(GridSpec("gauss", 2, 256))
    assert grids.gauss_grid(3, 64).bits == 2.0


@pytest.mark.parametrize("p,n", [(2, 5), (5, 256), (1, 3), (3, 16)])
def test_unavailable_grid_raises_naming_it(p, n):
    with pytest.raises(ValueError, match=rf"\({p}, {n}\).*available"):
        grids.gauss_grid(p, n)
    with pytest.raises(ValueError, match=rf"\({p}, {n}\)"):
        grids.grid_values(GridSpec("gauss", p, n))


@pytest.mark.parametrize(
    "kind,p,n,bad",
    [("lattice", 2, 16, "lattice"), ("gauss", 0, 16, "0"), ("gauss", 2, 1.5, "1.5"),
     ("nf4", 1, 8, "n=8"), ("int", 1, 12, "n=12"), ("int", 2, 16, "p=2")],
)  # fmt: skip
def test_invalid_spec_raises(kind, p, n, bad):
    with pytest.raises(ValueError, match=bad):
        GridSpec(kind, p, n)


def test_nearest_code_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        grids.nearest_code(jnp.zeros((4, 3)), grids.gauss_grid(2, 16))


def test_grid_mse_rejects_bad_sample_count():
    with pytest.raises(ValueError, match="-5"):
        grids.grid_mse(grids.gauss_grid(1, 4), num_samples=-5)
