"""Quantizing single arrays: error ~ grid MSE, layouts, baselines, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax import grids
from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig
from higgs_jax.qtensor import HiggsTensor, dequantize
from higgs_jax.quantize import expected_bits_per_weight, quantize, quantize_with_error, resolve_layout


def _gauss(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize(
    "p,bits", [(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4), (3, 2), (4, 2)]
)
def test_error_matches_grid_mse_on_gaussian(p, bits):
    w = _gauss((384, 256), seed=p * 10 + bits)
    cfg = HiggsConfig(bits=bits, p=p, hadamard_size=96 if p == 3 else 128)
    qt, t2 = quantize_with_error(w, cfg, axis=0)
    mse = grids.SPEC_GRID_MSE.get((p, cfg.n)) or grids.grid_mse(cfg.grid, 1 << 17)
    # Scale normalisation makes the error slightly smaller than the pure-Gaussian MSE; bf16 scales
    # and finite sample noise widen it a little.
    assert 0.9 * mse < t2 < 1.06 * mse, (t2, mse)
    # The reported error is the real one.
    w_hat = dequantize(qt)
    real = float(jnp.sum((w_hat - w) ** 2) / jnp.sum(w**2))
    np.testing.assert_allclose(t2, real, rtol=1e-4)


def test_heavy_tailed_higgs_beats_nf4():
    w = jax.random.t(jax.random.key(3), 3.0, (1024, 256))
    _, t2_higgs = quantize_with_error(w, HiggsConfig(bits=4, p=2, hadamard_size=256), axis=0)
    _, t2_nf4 = quantize_with_error(w, NF4Config(), axis=0)
    assert t2_higgs < t2_nf4


def test_grid_points_are_fixed_points():
    # A column that is already "on the grid" after rotation and scaling quantizes exactly:
    # h = 1 (no rotation), scalar int grid, values = levels * scale.
    cfg = RTNConfig(bits=4, group_size=8)
    levels = grids.grid_values(cfg.grid)[:, 0]
    lv = levels[np.abs(levels) <= 7]
    col = np.concatenate([lv[:7], [7.0]])  # absmax 7 -> scale 1
    w = jnp.asarray(np.tile(col[:, None], (4, 3)), jnp.float32)
    qt, t2 = quantize_with_error(w, cfg, axis=0)
    assert t2 == 0.0
    np.testing.assert_array_equal(np.asarray(dequantize(qt)), np.asarray(w))


@pytest.mark.parametrize("axis", [0, 1])
def test_axis_is_respected(axis):
    w = _gauss((256, 64)) if axis == 0 else _gauss((64, 256))
    qt = quantize(w, HiggsConfig(bits=4, p=1, hadamard_size=64), axis=axis)
    assert qt.shape == w.shape and qt.K == 256 and qt.N == 64
    assert dequantize(qt).shape == w.shape
    # Quantizing W^T along axis 1 is the same as W along axis 0.
    if axis == 1:
        q0 = quantize(w.T, HiggsConfig(bits=4, p=1, hadamard_size=64), axis=0)
        np.testing.assert_allclose(np.asarray(dequantize(q0)), np.asarray(dequantize(qt)).T)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_input_dtypes(dtype):
    w = _gauss((128, 32), dtype=dtype)
    qt = quantize(w, HiggsConfig(bits=4, p=2, hadamard_size=64), axis=0)
    assert dequantize(qt).dtype == dtype
    assert qt.scales.dtype == jnp.bfloat16


def test_non_power_of_two_k_uses_paley_order():
    # K = 576 = 2^4 * 36: no power-of-two 512 block divides it, the order-576 Hadamard does.
    h, g, k_pad = resolve_layout(576, HiggsConfig(hadamard_size=512))
    assert (h, g, k_pad) == (576, 576, 576)
    w = _gauss((576, 64))
    qt, t2 = quantize_with_error(w, HiggsConfig(bits=4, p=2, hadamard_size=512), axis=0)
    assert qt.hadamard_size == 576 and qt.k_pad == 576
    assert t2 < 1.06 * grids.SPEC_GRID_MSE[(2, 256)]


def test_indivisible_k_pads_and_counts_padding():
    # K = 172 = 4 * 43 has no usable Hadamard order: pad to 192 with h = 64.
    h, g, k_pad = resolve_layout(172, HiggsConfig(hadamard_size=512))
    assert (h, k_pad) == (64, 192)
    w = _gauss((172, 64))
    qt, t2 = quantize_with_error(w, HiggsConfig(bits=4, p=2, hadamard_size=512), axis=0)
    assert qt.k_pad == 192
    # Padding rows cost bits: (192/2 codes * 8 bits + 3 scales * 16 bits) per column / 172.
    expected = (96 * 8 + 3 * 16) / 172
    assert qt.bits_per_weight == pytest.approx(expected)
    assert expected_bits_per_weight((172, 64), HiggsConfig(hadamard_size=512)) == pytest.approx(expected)
    assert dequantize(qt).shape == (172, 64)
    with pytest.raises(ValueError, match="172"):
        quantize(w, HiggsConfig(hadamard_size=64, indivisible="error"), axis=0)


@pytest.mark.parametrize(
    "spec,expected",
    [
        (HiggsConfig(bits=4, p=2, hadamard_size=512), 4 + 16 / 512),
        (HiggsConfig(bits=3, p=1, hadamard_size=128), 3 + 16 / 128),
        (HiggsConfig(bits=2, p=2, hadamard_size=256, group_size=64), 2 + 16 / 64),
        (NF4Config(), 4 + 16 / 64),
        (RTNConfig(bits=3, group_size=128), 3 + 16 / 128),
    ],
)
def test_bits_per_weight_counts_codes_and_scales(spec, expected):
    qt = quantize(_gauss((1024, 16)), spec, axis=0)
    assert qt.bits_per_weight == pytest.approx(expected)
    assert expected_bits_per_weight((1024, 16), spec) == pytest.approx(expected)
    assert qt.codes.size * 32 == 1024 * 16 * spec.grid.bits * (1 if spec.grid.p == 1 else 1)


def test_random_signs_need_key_and_are_stored():
    cfg = HiggsConfig(bits=4, p=2, hadamard_size=64, random_signs=True)
    w = _gauss((128, 32))
    with pytest.raises(ValueError, match="key"):
        quantize(w, cfg, axis=0)
    qt, t2 = quantize_with_error(w, cfg, axis=0, key=jax.random.key(1))
    assert qt.signs is not None and qt.signs.shape == (128,)
    assert set(np.unique(np.asarray(qt.signs)).tolist()) == {-1, 1}
    real = float(jnp.sum((dequantize(qt) - w) ** 2) / jnp.sum(w**2))
    np.testing.assert_allclose(t2, real, rtol=1e-4)


def test_large_matrix_chunks():
    # More columns than one chunk holds: chunking must not change the result.
    w = _gauss((2048, 1500))
    qt, t2 = quantize_with_error(w, HiggsConfig(bits=2, p=2, hadamard_size=256), axis=0)
    assert qt.codes.shape[1] == 1500
    assert t2 < 1.06 * grids.SPEC_GRID_MSE[(2, 16)]


def test_zero_matrix():
    qt, t2 = quantize_with_error(jnp.zeros((64, 8)), HiggsConfig(hadamard_size=64), axis=0)
    assert t2 == 0.0 and float(jnp.abs(dequantize(qt)).max()) == 0.0


@pytest.mark.parametrize(
    "w,spec,axis,match",
    [
        (jnp.zeros((4, 4, 4)), HiggsConfig(), 0, "2-D"),
        (jnp.zeros((64,)), HiggsConfig(), 0, "2-D"),
        (jnp.zeros((64, 4), jnp.int32), HiggsConfig(hadamard_size=64), 0, "int32"),
        (jnp.zeros((64, 4)).at[3, 1].set(jnp.nan), HiggsConfig(hadamard_size=64), 0, "NaN"),
        (jnp.zeros((64, 4)).at[0, 0].set(jnp.inf), HiggsConfig(hadamard_size=64), 0, "NaN/Inf"),
        (jnp.zeros((64, 4)), HiggsConfig(hadamard_size=64), 2, "axis"),
        (jnp.zeros((64, 4)), "higgs", 0, "spec"),
    ],
)
def test_bad_input(w, spec, axis, match):
    with pytest.raises(ValueError, match=match):
        quantize(w, spec, axis=axis)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=7, p=2), r"\(2, 16384\)"),
        (dict(bits=2.5, p=1), "non-integer"),
        (dict(p=7), "p must"),
        (dict(hadamard_size=172), "172"),
        (dict(hadamard_size=0), "hadamard_size"),
        (dict(hadamard_size=64, group_size=48), "group_size=48"),
        (dict(scale_dtype="float8"), "float8"),
        (dict(indivisible="truncate"), "truncate"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiggsConfig(**kwargs)


def test_baseline_config_validation():
    with pytest.raises(ValueError, match="bits"):
        RTNConfig(bits=1)
    with pytest.raises(ValueError, match="block_size"):
        NF4Config(block_size=0)


def test_nf4_levels_and_absmax():
    w = _gauss((128, 8))
    qt = quantize(w, NF4Config(block_size=64), axis=0)
    assert isinstance(qt, HiggsTensor) and qt.hadamard_size == 1
    # absmax per block is reproduced exactly up to the bf16 scale.
    w_hat = np.asarray(dequantize(qt)).reshape(2, 64, 8)
    absmax = np.abs(np.asarray(w)).reshape(2, 64, 8).max(1)
    np.testing.assert_allclose(np.abs(w_hat).max(1), absmax, rtol=1e-2)
