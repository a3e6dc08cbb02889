"""The activation rotation in the matmul kernel's prologue (`Config.rotation = "fused"`, fused.py).

Interpret mode (CPU): the fused op returns the same bits as the two-launch op of
``rotation="kernel"`` (the same rotation code, the same kernel body) and matches the f32
reference, for bf16/f16/f32 activations, M = 1..8, K not a multiple of h, program ranges that
are aligned with the Hadamard blocks, inside one block, or straddling blocks, with a bias and a
pre-norm; where it does not apply the op falls back to the separate rotation (same values).
GPU (marker ``gpu``): the same equalities compiled for real, on small and Llama-sized shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_higgs_matmul import _on_gpu, make_weight, rel_err, signmag_weight

from higgs_jax.norms import rms_norm
from pallas_kernels.higgs_matmul import Config, fused, higgs_matmul_pallas, wrapper
from pallas_kernels.higgs_matmul.config import default_config
from pallas_kernels.higgs_matmul.reference import higgs_matmul_reference
from pallas_kernels.higgs_matmul.repack import repack

gpu = pytest.mark.skipif(not _on_gpu(), reason="needs an NVIDIA GPU")


def _weight(k, n_cols, n, h, seed=0):
    w = signmag_weight(make_weight(k, n_cols, 1, n, g=h, h=h, seed=seed))
    signs = np.where(np.random.default_rng(seed).random(w.k_pad) < 0.5, -1, 1).astype(np.int8)
    return dataclasses.replace(w, signs=jnp.asarray(signs))


def test_blocks_per_program():
    assert fused.blocks_per_program(4, 16, 32) == 2  # 64 units = 2 blocks of 32, aligned
    assert fused.blocks_per_program(1, 8, 32) == 1  # 8 units inside one block
    assert fused.blocks_per_program(3, 8, 16) == 3  # 24 units may start mid-block: 3 blocks
    assert fused.blocks_per_program(7, 16, 32) == 5  # 112 units: up to 5 blocks


def test_applies_names_the_reason():
    assert fused.applies(1, 1024, "fma", "xla", True) == (True, "ok")
    assert "p=2" in fused.applies(2, 1024, "fma", "xla", True)[1]
    assert "hadamard_size=256" in fused.applies(1, 256, "fma", "xla", True)[1]
    assert "path='dot'" in fused.applies(1, 1024, "dot", "xla", True)[1]
    assert "reduce='kernel'" in fused.applies(1, 1024, "fma", "kernel", True)[1]
    assert not fused.applies(1, 1024, "fma", "xla", False)[0]
    with pytest.raises(ValueError, match="rotation must be one of"):
        Config(rotation="prologue")


# (M, K, dtype, block_k, split_k): program ranges aligned (2 blocks), inside one block (split-K
# programs share a block), straddling blocks (T = 24 units, XB = 16), K not a multiple of h
CASES = [
    (1, 1536, jnp.bfloat16, 512, 2),
    (3, 1500, jnp.float32, 256, 4),
    (1, 2400, jnp.bfloat16, 256, 4),
    (2, 3000, jnp.float16, 512, 3),
    (8, 1024, jnp.bfloat16, 256, 8),
]


def _check_fused(m, k, dtype, block_k, split, *, interpret, h=512, n_cols=64, bias=False):
    w = _weight(k, n_cols, 16, h, seed=m + k)
    cfg = Config(block_n=64, block_k=block_k, split_k=split, path="fma", fused_fma=True,
                 rotation="fused")
    assert wrapper.fused_rotation_applies(repack(w), cfg) == (True, "ok")
    x = jax.random.normal(jax.random.key(m * k), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (n_cols,), jnp.float32) if bias else None
    y = higgs_matmul_pallas(x, w, bias=b, config=cfg, interpret=interpret)
    y2 = higgs_matmul_pallas(
        x, w, bias=b, config=dataclasses.replace(cfg, rotation="kernel"), interpret=interpret
    )
    assert y.dtype == dtype and y.shape == (m, n_cols)
    # the same rotation code and kernel body: the same bits as the two-launch op
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y2, np.float32))
    ref = higgs_matmul_reference(x.astype(jnp.float32), w, b)
    assert rel_err(y, ref) < (2e-3 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("m,k,dtype,block_k,split", CASES)
def test_fused_matches_two_launches_and_reference(m, k, dtype, block_k, split):
    _check_fused(m, k, dtype, block_k, split, interpret=True)


def test_fused_with_bias_and_h1024():
    _check_fused(1, 2048, jnp.bfloat16, 512, 2, interpret=True, h=1024, bias=True)


def test_fused_with_pre_norm():
    w = _weight(1536, 64, 16, 512)
    cfg = Config(block_n=64, block_k=512, split_k=2, path="fma", rotation="fused")
    x = jax.random.normal(jax.random.key(3), (2, 1536), jnp.bfloat16)
    scale = jax.random.uniform(jax.random.key(4), (1536,), jnp.float32, 0.5, 1.5)
    y = higgs_matmul_pallas(x, w, config=cfg, interpret=True, norm_scale=scale, norm_eps=1e-5)
    y2 = higgs_matmul_pallas(rms_norm(x, scale, 1e-5), w, config=cfg, interpret=True)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y2, np.float32))


@pytest.mark.parametrize(
    "over,h",
    [({"reduce": "kernel"}, 512), ({"path": "dot", "block_m": 16}, 512), ({}, 256)],
)
def test_fused_falls_back_to_the_separate_rotation(over, h):
    """Where the prologue does not apply, "fused" runs the two-launch op (same values)."""
    w = _weight(1024, 64, 16, h)
    base = {"block_n": 64, "block_k": 512, "split_k": 2, "path": "fma", "rotation": "fused"}
    cfg = Config(**(base | over))
    ok, why = wrapper.fused_rotation_applies(repack(w), cfg)
    assert not ok and why
    x = jax.random.normal(jax.random.key(5), (2, 1024), jnp.bfloat16)
    y = higgs_matmul_pallas(x, w, config=cfg, interpret=True)
    y2 = higgs_matmul_pallas(x, w, config=dataclasses.replace(cfg, rotation="kernel"),
                             interpret=True)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y2, np.float32))


# ------------------------------------------------------------------------------------- GPU
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,k,dtype,block_k,split", CASES)
def test_gpu_fused_matches_two_launches(m, k, dtype, block_k, split):
    _check_fused(m, k, dtype, block_k, split, interpret=False, bias=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,n_grid", [(1, 4096, 4096, 16), (1, 14336, 4096, 8), (4, 4096, 6144, 4)])
def test_gpu_fused_default_tiling_llama_shapes(m, k, n, n_grid):
    """The heuristic default tiling (8 warps, register tables, inline-PTX FMAs) with the
    rotation in the prologue, h = 1024, against the two-launch op and the reference."""
    w = _weight(k, n, n_grid, 1024, seed=k)
    # the fma path's default tiling (M = 4 at 4096x6144 takes the dot path by default)
    cfg = default_config(m, k, n, 1, np.log2(n_grid), fma=True)
    cfg = dataclasses.replace(cfg, rotation="fused")
    assert wrapper.fused_rotation_applies(repack(w), cfg)[0]
    x = jax.random.normal(jax.random.key(k), (m, k), jnp.bfloat16)
    y = higgs_matmul_pallas(x, w, config=cfg)
    y2 = higgs_matmul_pallas(x, w, config=dataclasses.replace(cfg, rotation="kernel"))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y2, np.float32))
    assert rel_err(y, higgs_matmul_reference(x.astype(jnp.float32), w)) < 2e-2
