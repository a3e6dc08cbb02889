"""Split-K partial sums summed inside the kernel (`Config.reduce = "kernel"`, splitk.py).

Interpret mode (CPU) for every kernel path, the Triton IR (one atomic per program, a barrier
before it), bad input, and the same equalities on the GPU (marker ``gpu``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_nk_path import _nk_weight
from test_pallas_higgs_matmul import _on_gpu, make_weight, rel_err, signmag_weight

from pallas_kernels.higgs_matmul import Config, higgs_matmul_pallas
from pallas_kernels.higgs_matmul.config import nk_config
from pallas_kernels.higgs_matmul.reference import higgs_matmul_reference

#: (name, p, n, config): one case per kernel path; small tiles so that several programs share
#: each output tile (split_k) and the last column block is partly masked (N = 80, 64 columns).
CASES = [
    ("fma_p1_4b", 1, 16, Config(block_n=64, block_k=64, split_k=3, path="fma")),
    ("fma_p1_3b", 1, 8, Config(block_n=64, block_k=64, split_k=2, path="fma")),
    ("fma_p2_8b", 2, 256, Config(block_n=64, block_k=128, split_k=2, path="fma")),
    ("gemv_p1_2b", 1, 4, Config(block_n=64, block_k=64, split_k=2, path="gemv")),
    ("dot_p1_4b", 1, 16, Config(block_n=64, block_k=512, split_k=2, path="dot", block_m=16)),
    ("wide_p1_2b", 1, 4, Config(block_n=64, block_k=512, split_k=2, path="wide", block_m=16)),
]


def _weight(p, n, k=1200, n_cols=80, **kw):
    return signmag_weight(make_weight(k, n_cols, p, n, g=64 * p if p > 1 else 64, **kw))


def _pair(x, w, cfg, bias=None, interpret=True):
    ya = higgs_matmul_pallas(x, w, bias=bias, config=cfg, interpret=interpret)
    yk = higgs_matmul_pallas(
        x, w, bias=bias, config=dataclasses.replace(cfg, reduce="kernel"), interpret=interpret
    )
    return ya, yk


@pytest.mark.parametrize("name,p,n,cfg", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("m", [1, 3])
def test_kernel_reduce_matches_xla_sum(name, p, n, cfg, m):
    w = _weight(p, n)
    if cfg.path in ("dot", "wide") and m == 3:
        m = 20  # two 16-row blocks, the second one padded
    x = jax.random.normal(jax.random.key(m), (m, 1200), jnp.float32)
    bias = jax.random.normal(jax.random.key(7), (80,), jnp.float32)
    ya, yk = _pair(x, w, cfg, bias)
    assert yk.shape == (m, 80) and yk.dtype == jnp.float32
    # the same partial sums, summed in split order (XLA's reduction order may differ: f32 ulps)
    np.testing.assert_allclose(np.asarray(yk), np.asarray(ya), rtol=2e-5, atol=2e-5)
    ref = higgs_matmul_reference(x, w) + bias
    assert rel_err(yk, ref) < 2e-2


@pytest.mark.parametrize("cb,m", [(4, 1), (4, 16), (2, 20), (4, 64)])
def test_kernel_reduce_nk_path(cb, m):
    w = _nk_weight(1536, 320, 2**cb)
    cfg = dataclasses.replace(nk_config(m, 1536, 320, code_bits=cb), block_n=64, split_k=3)
    x = jax.random.normal(jax.random.key(m), (m, 1536), jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(3), (320,), jnp.float32)
    ya, yk = _pair(x, w, cfg, bias)
    assert yk.dtype == jnp.bfloat16 and yk.shape == (m, 320)
    # bf16 outputs of the same f32 sums: equal up to one rounding step of the last bit
    np.testing.assert_allclose(
        np.asarray(yk, np.float32), np.asarray(ya, np.float32), rtol=8e-3, atol=1e-2
    )
    assert rel_err(yk, higgs_matmul_reference(x.astype(jnp.float32), w) + bias) < 2e-2


def test_kernel_reduce_split_one_and_no_bias():
    w = _weight(1, 16)
    x = jax.random.normal(jax.random.key(0), (2, 1200), jnp.float32)
    cfg = Config(block_n=64, block_k=64, split_k=1, path="fma")
    ya, yk = _pair(x, w, cfg)
    np.testing.assert_allclose(np.asarray(yk), np.asarray(ya), rtol=2e-5, atol=2e-5)


def test_kernel_reduce_with_outliers_keeps_f32_until_added():
    w = _weight(1, 16, outliers=40)
    x = jax.random.normal(jax.random.key(1), (1, 1200), jnp.bfloat16)
    cfg = Config(block_n=64, block_k=64, split_k=2, path="fma")
    ya, yk = _pair(x, w, cfg)
    # outliers are added to the f32 sum before the one rounding to bf16, as with reduce="xla"
    np.testing.assert_allclose(
        np.asarray(yk, np.float32), np.asarray(ya, np.float32), rtol=8e-3, atol=1e-2
    )
    assert rel_err(yk, higgs_matmul_reference(x.astype(jnp.float32), w)) < 2e-2


def test_kernel_reduce_exact_dequantisation():
    """x = I: the kernel-side sum returns the dequantised (rotated-domain) weight rows."""
    w = _weight(1, 16, k=256, n_cols=64)
    eye = jnp.eye(256, dtype=jnp.float32)
    cfg = Config(block_n=64, block_k=64, split_k=4, path="dot", block_m=16)
    cfg = dataclasses.replace(cfg, block_k=512, split_k=1)
    ya, yk = _pair(eye, w, cfg)
    np.testing.assert_allclose(np.asarray(yk), np.asarray(ya), rtol=1e-6, atol=1e-6)


def test_kernel_reduce_ir_has_one_atomic_after_a_barrier():
    """The lowered Triton IR (CPU, no GPU needed): one scalar atomic add per program on the
    counters, a barrier before it, and the final store under the `last program` branch."""
    from benchmarks.sass_count import capture_ttir

    w = _weight(1, 16, k=2048, n_cols=256)
    x = jnp.zeros((1, 2048), jnp.bfloat16)
    cfg = Config(block_n=64, block_k=512, split_k=4, path="fma", reduce="kernel")
    ir = capture_ttir(x, w, cfg)
    lines = ir.splitlines()
    atomics = [i for i, line in enumerate(lines) if "tt.atomic_rmw" in line]
    assert len(atomics) == 1, atomics
    assert "acq_rel" in lines[atomics[0]] and "gpu" in lines[atomics[0]]
    barriers = [i for i, line in enumerate(lines) if "gpu.barrier" in line]
    assert any(b < atomics[0] for b in barriers)
    assert any("scf.if" in line for line in lines[atomics[0]:])


def test_reduce_bad_value():
    with pytest.raises(ValueError, match="reduce must be one of .* got 'sum'"):
        Config(reduce="sum")


# -- GPU ------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not _on_gpu(), reason="needs an NVIDIA GPU")

GPU_CASES = [
    ("fma_p1_4b_m1", 1, 16, 1, Config(block_n=128, block_k=512, split_k=8, path="fma",
                                      num_warps=8, fused_fma=True)),
    ("fma_p1_2b_m4", 1, 4, 4, Config(block_n=128, block_k=512, split_k=16, path="fma",
                                     fused_fma=True)),
    ("fma_p2_8b_m1", 2, 256, 1, Config(block_n=128, block_k=1024, split_k=8, path="fma")),
    ("dot_p1_4b_m16", 1, 16, 16, Config(block_n=128, block_k=512, split_k=4, path="dot")),
    ("dot_p1_4b_m64", 1, 16, 64, Config(block_n=128, block_k=512, split_k=4, path="dot",
                                        block_m=64)),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name,p,n,m,cfg", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_kernel_reduce_matches_xla_sum(name, p, n, m, cfg):
    w = _weight(p, n, k=8192, n_cols=1000)
    x = jax.random.normal(jax.random.key(m), (m, 8192), jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(2), (1000,), jnp.float32)
    ya, yk = _pair(x, w, cfg, bias, interpret=False)
    np.testing.assert_allclose(
        np.asarray(yk, np.float32), np.asarray(ya, np.float32), rtol=8e-3, atol=2e-2
    )
    assert rel_err(yk, higgs_matmul_reference(x.astype(jnp.float32), w) + bias) < 2e-2
    # the last program of each tile sums in split order, whichever program it is: repeated
    # launches give the same bits
    for _ in range(3):
        again = higgs_matmul_pallas(
            x, w, bias=bias, config=dataclasses.replace(cfg, reduce="kernel"), interpret=False
        )
        np.testing.assert_array_equal(np.asarray(again), np.asarray(yk))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cb,m", [(4, 1), (4, 16), (2, 16), (4, 64)])
def test_gpu_kernel_reduce_nk(cb, m):
    w = _nk_weight(8192, 1024, 2**cb)
    cfg = dataclasses.replace(nk_config(m, 8192, 1024, code_bits=cb), reduce="kernel")
    x = jax.random.normal(jax.random.key(m), (m, 8192), jnp.bfloat16)
    ya, yk = _pair(x, w, dataclasses.replace(cfg, reduce="xla"), None, interpret=False)
    np.testing.assert_allclose(
        np.asarray(yk, np.float32), np.asarray(ya, np.float32), rtol=8e-3, atol=2e-2
    )
    assert rel_err(yk, higgs_matmul_reference(x.astype(jnp.float32), w)) < 2e-2
