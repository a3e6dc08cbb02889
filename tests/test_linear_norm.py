"""`higgs_jax.matmul.linear` / `higgs_matmul` with a pre-RMSNorm (norm_scale, norm_eps) on the
routes that normalise outside a kernel: dense kernels and the XLA HIGGS path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import higgs_jax as hj
from higgs_jax.norms import rms_norm


def _case():
    key = jax.random.key(0)
    h = 20.0 * jax.random.normal(key, (2, 3, 256), jnp.float32)
    scale = jax.random.uniform(jax.random.fold_in(key, 1), (256,), jnp.float32, 0.5, 1.5)
    w = jax.random.normal(jax.random.fold_in(key, 2), (256, 64), jnp.float32)
    return h, scale, w


def test_rms_norm_definition():
    h, scale, _ = _case()
    xf = np.asarray(h, np.float64)
    want = xf / np.sqrt((xf**2).mean(-1, keepdims=True) + 1e-5) * np.asarray(scale)
    np.testing.assert_allclose(np.asarray(rms_norm(h, scale, 1e-5)), want, rtol=1e-5)
    assert rms_norm(h.astype(jnp.bfloat16), scale, 1e-5).dtype == jnp.bfloat16


def test_linear_with_norm_is_norm_then_linear():
    h, scale, w = _case()
    bias = jnp.arange(64, dtype=jnp.float32)
    dense = hj.linear(h, w, bias, norm_scale=scale, norm_eps=1e-5)
    np.testing.assert_array_equal(
        np.asarray(dense), np.asarray(hj.linear(rms_norm(h, scale, 1e-5), w, bias))
    )
    qt = hj.quantize(w, hj.HiggsConfig(bits=4, p=2, hadamard_size=256), axis=0)
    q = hj.linear(h, qt, bias, norm_scale=scale, norm_eps=1e-5, implementation="xla")
    ref = hj.higgs_matmul(rms_norm(h, scale, 1e-5), qt, bias, implementation="xla")
    np.testing.assert_array_equal(np.asarray(q), np.asarray(ref))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"norm_scale": jnp.ones(255), "norm_eps": 1e-5},
            r"norm_scale has shape \(255,\), want \(256,\)",
        ),
        ({"norm_scale": jnp.ones(256)}, "norm_eps must be a positive float, got None"),
        (
            {"norm_scale": jnp.ones(256), "norm_eps": 0.0},
            "norm_eps must be a positive float, got 0.0",
        ),
        ({"norm_eps": 1e-5}, "norm_scale has shape NoneType"),
    ],
)
def test_linear_norm_bad_input(kwargs, match):
    h, _, w = _case()
    qt = hj.quantize(w, hj.HiggsConfig(bits=4, p=2, hadamard_size=256), axis=0)
    with pytest.raises(ValueError, match=match):
        hj.linear(h, w, **kwargs)
    with pytest.raises(ValueError, match=match):
        hj.linear(h, qt, **kwargs)
