"""Tests for higgs_jax.hadamard: exact orthogonality, fast transforms vs dense float64 references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax import hadamard

REQUIRED_M = (12, 20, 28, 36, 44, 52, 60, 76, 108, 124, 148)
LLM_WIDTHS = (576, 896, 1536, 3584, 4864, 14336, 18944)
SMALL_ORDERS = tuple(n for n in range(1, 1025) if hadamard.is_hadamard_order(n))
UNSUPPORTED = (172, 6, 0, -4, 3, 156, 92)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _dense(n: int) -> np.ndarray:
    return np.asarray(hadamard.hadamard_matrix(n), dtype=np.float64)


def _ref_transform(x, n, *, axis=-1, normalize=True, transpose=False):
    """numpy float64 reference: y_i = sum_j H[i, j] x_j along `axis`."""
    h = _dense(n)
    h = h.T if transpose else h
    if normalize:
        h = h / np.sqrt(n)
    xm = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    return np.moveaxis(xm @ h.T, -1, axis)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


# ---------------------------------------------------------------------------------------------
# Orders and dense matrices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", sorted(set(SMALL_ORDERS) | set(REQUIRED_M) | {576, 1536}))
def test_hadamard_matrix_is_exactly_orthogonal(n):
    h = hadamard.hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == np.float32
    assert set(np.unique(h).tolist()) <= {-1.0, 1.0}
    # +-1 entries and |sums| <= n < 2^24: the float32 product is exact.
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.float32))


@pytest.mark.parametrize("m", hadamard.paley_orders(300))
def test_every_paley_order_up_to_300_is_hadamard(m):
    h = hadamard.hadamard_matrix(m).astype(np.int64)
    np.testing.assert_array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


def test_paley_orders_contains_required_and_excludes_williamson_only():
    orders = hadamard.paley_orders(300)
    assert set(REQUIRED_M) <= set(orders)
    assert 172 not in orders and 156 not in orders and 16 not in orders
    assert orders == tuple(sorted(orders))
    assert all(m % 4 == 0 for m in orders)
    assert all(o <= 100 for o in hadamard.paley_orders(100))


def test_hadamard_matrix_is_cached_and_read_only():
    h = hadamard.hadamard_matrix(28)
    assert hadamard.hadamard_matrix(28) is h
    with pytest.raises(ValueError):
        h[0, 0] = 5.0


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, (1, 1)),
        (64, (64, 1)),
        (12, (1, 12)),
        (24, (2, 12)),
        (576, (16, 36)),
        (1536, (128, 12)),
        (14336, (512, 28)),
        (18944, (128, 148)),
        (4864, (64, 76)),
        (896, (32, 28)),
        (3584, (128, 28)),
    ],
)
def test_factorization_is_canonical(n, expected):
    assert hadamard.hadamard_factorization(n) == expected
    assert hadamard.is_hadamard_order(n)


def test_matrix_is_sylvester_kron_paley():
    pow2, m = hadamard.hadamard_factorization(576)
    h = _dense(576)
    np.testing.assert_array_equal(h, np.kron(_dense(pow2), _dense(m)))
    # Sylvester order: H[i, j] = (-1)^popcount(i & j).
    syl = 1 - 2 * (np.array([[(a & b).bit_count() for b in range(16)] for a in range(16)]) % 2)
    np.testing.assert_array_equal(_dense(16), syl)


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_order_raises_naming_n(n):
    assert not hadamard.is_hadamard_order(n)
    with pytest.raises(ValueError, match=rf"n={n}\b"):
        hadamard.hadamard_factorization(n)
    with pytest.raises(ValueError, match=rf"{n}"):
        hadamard.hadamard_matrix(n)


@pytest.mark.parametrize("bad", [2.0, "8", None, True])
def test_non_integer_orders_are_rejected(bad):
    assert not hadamard.is_hadamard_order(bad)
    with pytest.raises(ValueError, match="positive integer"):
        hadamard.hadamard_factorization(bad)


# ---------------------------------------------------------------------------------------------
# FWHT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, rows", [(1, 4), (2, 4), (8, 5), (64, 3), (1024, 3), (2**15, 2)])
@pytest.mark.parametrize("normalize", [True, False])
def test_fwht_matches_dense(n, rows, normalize):
    x = _x((rows, n), seed=n)
    y = hadamard.fwht(jnp.asarray(x), normalize=normalize)
    if n <= 1024:
        ref = _ref_transform(x, n, normalize=normalize)
    else:  # the dense matrix would be huge: compare the first 64 outputs with rows built directly
        i, j = np.arange(64)[:, None], np.arange(n)[None, :]
        v, parity = i & j, np.zeros((64, n), np.int64)
        for bit in range(n.bit_length()):
            parity ^= (v >> bit) & 1
        rows = 1.0 - 2.0 * parity  # Sylvester: H[i, j] = (-1)^popcount(i & j)
        ref = x.astype(np.float64) @ rows.T / (np.sqrt(n) if normalize else 1.0)
        y = y[:, :64]
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert _rel_err(y, ref) < 1e-5


def test_fwht_large_is_self_inverse():
    x = _x((2, 2**15))
    z = hadamard.fwht(hadamard.fwht(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(z), x, atol=1e-4)


def test_fwht_batched_over_leading_axes():
    x = _x((2, 3, 4, 32))
    y = hadamard.fwht(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), _ref_transform(x, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [3, 12, 0])
def test_fwht_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match=rf"n={n}\b"):
        hadamard.fwht(jnp.zeros((2, n)))


# ---------------------------------------------------------------------------------------------
# hadamard_transform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 12, 20, 28, 52, 64, 108, 148, 344, 576, 1536])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_transform_matches_dense(n, normalize, transpose):
    x = _x((5, n), seed=n)
    y = hadamard.hadamard_transform(jnp.asarray(x), normalize=normalize, transpose=transpose)
    ref = _ref_transform(x, n, normalize=normalize, transpose=transpose)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert _rel_err(y, ref) < 2e-6 * np.log2(max(n, 2)) + 1e-6


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_hadamard_transform_along_any_axis(axis):
    shape = [3, 4, 5]
    shape[axis] = 20
    x = _x(tuple(shape))
    y = hadamard.hadamard_transform(jnp.asarray(x), axis=axis)
    np.testing.assert_allclose(np.asarray(y), _ref_transform(x, 20, axis=axis), atol=1e-5)


@pytest.mark.parametrize("n", [32, 28, 76, 576])
def test_orthonormal_round_trip(n):
    x = _x((4, n))
    y = hadamard.hadamard_transform(jnp.asarray(x))
    z = hadamard.hadamard_transform(y, transpose=True)
    np.testing.assert_allclose(np.asarray(z), x, atol=2e-5)
    # orthonormal: norms preserved
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_transform_of_identity_is_the_matrix():
    n = 60
    y = hadamard.hadamard_transform(jnp.eye(n), normalize=False, axis=0)
    np.testing.assert_array_equal(np.asarray(y), hadamard.hadamard_matrix(n))


@pytest.mark.parametrize("n", [172, 6, 92, 3])
def test_hadamard_transform_rejects_unsupported_length(n):
    with pytest.raises(ValueError, match=rf"n={n}\b"):
        hadamard.hadamard_transform(jnp.zeros((2, n)))


def test_hadamard_transform_rejects_bad_axis():
    with pytest.raises(ValueError, match="axis=3"):
        hadamard.hadamard_transform(jnp.zeros((2, 4)), axis=3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("n", [256, 28 * 8])
def test_low_precision_inputs_within_dtype_tolerance(dtype, n):
    x = jnp.asarray(_x((8, n)), dtype)
    y = hadamard.hadamard_transform(x)
    assert y.dtype == dtype
    ref = _ref_transform(np.asarray(x.astype(jnp.float32)), n)
    assert _rel_err(y.astype(jnp.float32), ref) < TOL[dtype]
    y32 = hadamard.hadamard_transform(x, out_dtype=jnp.float32)
    assert y32.dtype == jnp.float32 and _rel_err(y32, ref) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fwht_low_precision(dtype):
    x = jnp.asarray(_x((4, 512)), dtype)
    y = hadamard.fwht(x)
    assert y.dtype == dtype
    ref = _ref_transform(np.asarray(x.astype(jnp.float32)), 512)
    assert _rel_err(y.astype(jnp.float32), ref) < TOL[dtype]


def test_integer_input_gives_float32():
    y = hadamard.hadamard_transform(jnp.ones((2, 12), jnp.int32), normalize=False)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(y), hadamard.hadamard_matrix(12).sum(1)[None].repeat(2, 0)
    )


# ---------------------------------------------------------------------------------------------
# block_hadamard
# ---------------------------------------------------------------------------------------------


def _block_diag(h: int, nblocks: int, *, normalize=True, transpose=False) -> np.ndarray:
    hm = _dense(h)
    hm = hm.T if transpose else hm
    if normalize:
        hm = hm / np.sqrt(h)
    return np.kron(np.eye(nblocks), hm)


@pytest.mark.parametrize("h, nblocks", [(4, 3), (64, 4), (12, 5), (28, 3), (576, 2)])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("transpose", [False, True])
def test_block_hadamard_matches_block_diagonal(h, nblocks, axis, transpose):
    length = h * nblocks
    shape = (length, 7) if axis == 0 else (3, 7, length)
    x = _x(shape, seed=h)
    y = hadamard.block_hadamard(jnp.asarray(x), h, axis=axis, transpose=transpose)
    big = _block_diag(h, nblocks, transpose=transpose)
    ref = np.moveaxis(np.moveaxis(x.astype(np.float64), axis, -1) @ big.T, -1, axis)
    assert y.shape == x.shape
    assert _rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("h", [16, 20, 576])
@pytest.mark.parametrize("axis", [0, -1])
def test_block_hadamard_signs_round_trip(h, axis):
    length = 2 * h
    x = _x((length, 5) if axis == 0 else (5, length))
    s = hadamard.random_signs(jax.random.key(1), length)
    y = hadamard.block_hadamard(jnp.asarray(x), h, axis=axis, signs=s)
    z = hadamard.block_hadamard(y, h, axis=axis, transpose=True, signs=s)
    np.testing.assert_allclose(np.asarray(z), x, atol=3e-5)
    # signs act before the forward transform
    sx = np.asarray(s, np.float64).reshape((-1, 1) if axis == 0 else (1, -1)) * x
    big = _block_diag(h, 2)
    ref = big @ sx if axis == 0 else sx @ big.T
    assert _rel_err(y, ref) < 1e-5


def test_block_hadamard_signs_after_transpose():
    h, x = 12, _x((24, 3))
    s = hadamard.random_signs(jax.random.key(3), 24)
    y = hadamard.block_hadamard(jnp.asarray(x), h, axis=0, transpose=True, signs=s)
    ref = np.asarray(s, np.float64)[:, None] * (_block_diag(h, 2, transpose=True) @ x)
    assert _rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("length, h", [(100, 64), (30, 12), (20, 8)])
def test_block_hadamard_rejects_non_multiple(length, h):
    with pytest.raises(ValueError, match=rf"{length}.*h={h}"):
        hadamard.block_hadamard(jnp.zeros((3, length)), h)


def test_block_hadamard_rejects_unsupported_h():
    with pytest.raises(ValueError, match=r"n=172\b"):
        hadamard.block_hadamard(jnp.zeros((2, 344)), 172)


def test_block_hadamard_rejects_bad_signs_shape():
    with pytest.raises(ValueError, match=r"\(32,\)"):
        hadamard.block_hadamard(jnp.zeros((2, 32)), 16, signs=jnp.ones(16, jnp.int8))


# ---------------------------------------------------------------------------------------------
# jit / vmap / random signs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [64, 28])
def test_block_hadamard_under_jit(h):
    x = jnp.asarray(_x((4 * h, 6)))
    s = hadamard.random_signs(jax.random.key(0), 4 * h)
    f = jax.jit(functools.partial(hadamard.block_hadamard, h=h, axis=0))
    np.testing.assert_allclose(
        np.asarray(f(x, signs=s)),
        np.asarray(hadamard.block_hadamard(x, h, axis=0, signs=s)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_hadamard_transform_under_vmap_and_jit():
    x = jnp.asarray(_x((3, 5, 36)))
    f = jax.jit(jax.vmap(lambda v: hadamard.hadamard_transform(v, transpose=True)))
    np.testing.assert_allclose(
        np.asarray(f(x)), _ref_transform(np.asarray(x), 36, transpose=True), atol=1e-5
    )
    g = jax.vmap(hadamard.fwht, in_axes=1, out_axes=1)
    x2 = jnp.asarray(_x((4, 3, 128)))
    np.testing.assert_allclose(np.asarray(g(x2)), _ref_transform(np.asarray(x2), 128), atol=1e-5)


def test_random_signs_are_seeded_pm_one():
    s = hadamard.random_signs(jax.random.key(7), 4096)
    assert s.shape == (4096,) and s.dtype == jnp.int8
    assert set(np.unique(np.asarray(s)).tolist()) == {-1, 1}
    assert abs(int(jnp.sum(s.astype(jnp.int32)))) < 4 * np.sqrt(4096)  # ~4 sigma
    np.testing.assert_array_equal(s, hadamard.random_signs(jax.random.key(7), 4096))
    assert not np.array_equal(s, hadamard.random_signs(jax.random.key(8), 4096))
