"""The activation rotation as a Pallas kernel (`Config.rotation = "kernel"`, rotate.py).

Interpret mode (CPU): the kernel's blocked layout equals the XLA route's (dense +-1 matrix) for
bf16/f16/f32 activations, odd M and K, random signs; the whole op matches the reference; the
Sylvester factorisation; bad input. GPU (marker ``gpu``): the same equalities for real."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_higgs_matmul import _on_gpu, make_weight, rel_err, signmag_weight

from pallas_kernels.higgs_matmul import Config, higgs_matmul_pallas, rotate, wrapper
from pallas_kernels.higgs_matmul.config import nk_config
from pallas_kernels.higgs_matmul.reference import higgs_matmul_reference
from pallas_kernels.higgs_matmul.repack import to_nk16


def _weight(k, n_cols, n, h, seed=0):
    w = signmag_weight(make_weight(k, n_cols, 1, n, g=h, h=h, seed=seed))
    signs = np.where(np.random.default_rng(seed).random(w.k_pad) < 0.5, -1, 1).astype(np.int8)
    return dataclasses.replace(w, signs=jnp.asarray(signs))


def test_sylvester_kron_matches_rotation_matrix():
    """H_h = H_XB (x) H_32 in natural order, and the kernel's (c, u) output order is the XLA
    route's column permutation."""
    for h in (512, 1024, 2048):
        xb = h // 32
        kron = np.kron(rotate.sylvester(xb), rotate.sylvester(32))
        perm = (32 * np.arange(xb)[None, :] + np.arange(32)[:, None]).reshape(-1)  # (c, u)
        np.testing.assert_array_equal(kron[:, perm], wrapper.rotation_matrix(h, 1))


@pytest.mark.parametrize(
    "m,k,dtype,path",
    [
        (1, 1536, jnp.bfloat16, "fma"),
        (3, 1500, jnp.float32, "fma"),
        (16, 2048, jnp.bfloat16, "dot"),
        (20, 1100, jnp.float16, "dot"),
    ],
)
@pytest.mark.parametrize("h", [512, 1024])
def test_kernel_rotation_matches_xla_route(m, k, dtype, path, h):
    w = _weight(k, 64, 16, h)
    cfg = Config(block_n=64, block_k=512, split_k=2, path=path, block_m=16)
    x = jax.random.normal(jax.random.key(m + k), (m, k), dtype)
    a, xa = wrapper.prepare_activations(x, w, cfg, m, dtype, True)
    b, xb = wrapper.prepare_activations(
        x, w, dataclasses.replace(cfg, rotation="kernel"), m, dtype, True
    )
    assert xa == xb == h // 32 and a.shape == b.shape and a.dtype == b.dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # same exact +-1 products; only the f32 summation order differs
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * np.abs(a).max())
    assert np.all(b[m:] == 0)  # padded rows stay zero


def test_kernel_rotation_whole_op_nk16():
    w = to_nk16(_weight(2048, 256, 16, 512))
    cfg = dataclasses.replace(nk_config(16, 2048, 256, code_bits=4), rotation="kernel")
    x = jax.random.normal(jax.random.key(0), (16, 2048), jnp.bfloat16)
    y = higgs_matmul_pallas(x, w, config=cfg, interpret=True)
    assert rel_err(y, higgs_matmul_reference(x.astype(jnp.float32), w)) < 2e-2


def test_kernel_rotation_falls_back_where_unsupported():
    """h = 256 (XB = 8 < 16) keeps the XLA route: the same operand either way."""
    w = _weight(1024, 64, 16, 256)
    cfg = Config(block_n=64, block_k=256, split_k=2, path="fma")
    x = jax.random.normal(jax.random.key(1), (1, 1024), jnp.float32)
    a, _ = wrapper.prepare_activations(x, w, cfg, 1, jnp.float32, True)
    b, _ = wrapper.prepare_activations(
        x, w, dataclasses.replace(cfg, rotation="kernel"), 1, jnp.float32, True
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rotate.supported(1, 256) == (
        False, "hadamard_size=256 (the rotation kernel needs a power of two in [512, 2048])"
    )
    assert not rotate.supported(2, 512)[0]


def test_mask_covers_rows_and_blocks_beyond_x():
    """Windows past the end of x are masked whenever rows > M or blocks h > K, also when M is a
    multiple of the rows per program and K of h (14336x4096 with split-K padding to 32 blocks
    read garbage on the H100 before this rule; interpret mode pads, so it could not show it)."""
    assert not rotate.needs_mask(16, 8192, 16, 16, 512)
    assert rotate.needs_mask(16, 14336, 16, 32, 512)  # split-K pads the units to 32 blocks
    assert rotate.needs_mask(20, 2048, 32, 4, 512)  # M = 20 padded to 32 rows, 20 % 4 == 0
    assert rotate.needs_mask(1, 1500, 1, 3, 512)


def test_rotation_bad_input():
    with pytest.raises(ValueError, match="rotation must be one of .* got 'fwht'"):
        Config(rotation="fwht")
    x = jnp.zeros((2, 1024), jnp.int32)
    with pytest.raises(ValueError, match="activations must be f32/bf16/f16, got int32"):
        rotate.rotate(x, None, h=512, rows=2, blocks=2, dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="hadamard_size=384"):
        rotate.rotate(x, None, h=384, rows=2, blocks=3, dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"rows=1, blocks=2 x h=512 < x \(2, 1024\)"):
        rotate.rotate(x.astype(jnp.float32), None, h=512, rows=1, blocks=2, dtype=jnp.float32,
                      interpret=True)


# -- GPU ------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not _on_gpu(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "m,k,dtype,path,h",
    [
        (1, 8192, jnp.bfloat16, "fma", 512),
        (3, 4000, jnp.float32, "fma", 1024),
        (16, 8192, jnp.bfloat16, "dot", 512),
        (20, 4100, jnp.float16, "dot", 2048),
        (64, 14336, jnp.bfloat16, "dot", 512),
        (20, 2048, jnp.bfloat16, "dot", 512),  # rows 20 -> 32, M a multiple of 4
    ],
)
def test_gpu_kernel_rotation_matches_xla_route(m, k, dtype, path, h):
    w = _weight(k, 128, 16, h)
    cfg = Config(block_n=128, block_k=512, split_k=2, path=path, block_m=16 if m <= 16 else 64)
    x = jax.random.normal(jax.random.key(m + k), (m, k), dtype)
    a, _ = wrapper.prepare_activations(x, w, cfg, m, dtype, False)
    b, _ = wrapper.prepare_activations(
        x, w, dataclasses.replace(cfg, rotation="kernel"), m, dtype, False
    )
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * np.abs(a).max())
    assert np.all(b[m:] == 0)
    y = higgs_matmul_pallas(x, w, config=dataclasses.replace(cfg, rotation="kernel"))
    assert rel_err(y, higgs_matmul_reference(x.astype(jnp.float32), w)) < 2e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cb", [2, 4])
def test_gpu_kernel_rotation_split_k_padding(cb):
    """14336 rows with split 8: the kernel reads 32 Hadamard blocks of activations for 28 blocks
    of K; the 4 beyond K must be zero (the failure seen in the session-15 sweep)."""
    w = to_nk16(_weight(14336, 256, 2**cb, 512))
    cfg = dataclasses.replace(nk_config(16, 14336, 4096, code_bits=cb), block_n=128, split_k=8)
    x = jax.random.normal(jax.random.key(cb), (16, 14336), jnp.bfloat16)
    for rot in ("xla", "kernel"):
        y = higgs_matmul_pallas(x, w, config=dataclasses.replace(cfg, rotation=rot))
        assert rel_err(y, higgs_matmul_reference(x.astype(jnp.float32), w)) < 2e-2, rot
