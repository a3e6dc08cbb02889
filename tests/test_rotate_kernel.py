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


def _norm_case(m, k, dtype, seed=0):
    key = jax.random.key(seed)
    # a residual stream with a large common scale, so an un-normalised x would be far off
    x = (30.0 * jax.random.normal(key, (m, k), jnp.float32)).astype(dtype)
    scale = jax.random.uniform(jax.random.fold_in(key, 1), (k,), jnp.float32, 0.5, 1.5)
    return x, scale


@pytest.mark.parametrize(
    "m,k,dtype,path",
    [
        (1, 1536, jnp.bfloat16, "fma"),
        (3, 1500, jnp.float32, "fma"),  # K not a multiple of h: the mean is over the K entries
        (20, 1100, jnp.float16, "dot"),
    ],
)
def test_rotation_kernel_with_rms_norm(m, k, dtype, path):
    """norm=(scale, eps): the kernel's operand equals the XLA route's operand of rms_norm(x)."""
    from higgs_jax.norms import rms_norm

    w = _weight(k, 64, 16, 512)
    cfg = Config(block_n=64, block_k=512, split_k=2, path=path, block_m=16, rotation="xla")
    x, scale = _norm_case(m, k, dtype)
    a, _ = wrapper.prepare_activations(rms_norm(x, scale, 1e-5), w, cfg, m, dtype, True)
    b, _ = wrapper.prepare_activations(
        x, w, dataclasses.replace(cfg, rotation="kernel", norm="kernel"), m, dtype, True,
        norm=(scale, 1e-5),
    )
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * np.abs(a).max())
    assert np.all(b[m:] == 0)
    # the XLA route with norm= is rms_norm first: bit-identical to normalising by hand
    c, _ = wrapper.prepare_activations(x, w, cfg, m, dtype, True, norm=(scale, 1e-5))
    np.testing.assert_array_equal(np.asarray(c, np.float32), a)


@pytest.mark.parametrize("rotation,norm", [("kernel", "kernel"), ("kernel", "xla"), ("xla", "xla")])
def test_higgs_matmul_with_norm_matches_reference(rotation, norm):
    from higgs_jax.norms import rms_norm

    w = _weight(1024, 64, 16, 512)
    x, scale = _norm_case(2, 1024, jnp.float32, seed=3)
    cfg = Config(block_n=64, block_k=512, split_k=2, path="fma", rotation=rotation, norm=norm)
    y = higgs_matmul_pallas(x, w, config=cfg, interpret=True, norm_scale=scale, norm_eps=1e-6)
    xn = rms_norm(x, scale, 1e-6)
    # the same kernel on x normalised by hand: only the f32 summation order of the norm differs
    assert rel_err(y, higgs_matmul_pallas(xn, w, config=cfg, interpret=True)) < 1e-5
    assert rel_err(y, higgs_matmul_reference(xn, w)) < 2e-3
    assert rel_err(y, higgs_matmul_reference(x, w)) > 0.5  # the norm did happen


def test_norm_bad_input():
    w = _weight(1024, 64, 16, 512)
    x = jnp.ones((2, 1024), jnp.float32)
    with pytest.raises(ValueError, match=r"norm_scale has shape \(512,\), want \(1024,\)"):
        higgs_matmul_pallas(x, w, interpret=True, norm_scale=jnp.ones(512), norm_eps=1e-5)
    with pytest.raises(ValueError, match="norm_eps must be a positive float, got None"):
        higgs_matmul_pallas(x, w, interpret=True, norm_scale=jnp.ones(1024))
    with pytest.raises(ValueError, match="norm_eps must be a positive float, got -1.0"):
        higgs_matmul_pallas(x, w, interpret=True, norm_scale=jnp.ones(1024), norm_eps=-1.0)
    with pytest.raises(ValueError, match="norm_scale has shape NoneType"):
        higgs_matmul_pallas(x, w, interpret=True, norm_eps=1e-5)
    with pytest.raises(ValueError, match=r"rotation kernel: norm wants a \(1024,\) scale"):
        rotate.rotate(x, None, h=512, rows=2, blocks=2, dtype=jnp.float32, interpret=True,
                      norm=(jnp.ones(3), 1e-5))


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


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "m,k,dtype,path",
    [
        (1, 4096, jnp.bfloat16, "fma"),
        (3, 4000, jnp.float32, "fma"),
        (16, 4096, jnp.bfloat16, "dot"),
    ],
)
def test_gpu_rotation_kernel_with_rms_norm(m, k, dtype, path):
    from higgs_jax.norms import rms_norm

    w = _weight(k, 128, 16, 512)
    cfg = Config(
        block_n=128, block_k=512, split_k=2, path=path, block_m=16, rotation="kernel", norm="kernel"
    )
    x, scale = _norm_case(m, k, dtype)
    a, _ = wrapper.prepare_activations(rms_norm(x, scale, 1e-5), w, cfg, m, dtype, False)
    b, _ = wrapper.prepare_activations(x, w, cfg, m, dtype, False, norm=(scale, 1e-5))
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * np.abs(a).max())
    y = higgs_matmul_pallas(x, w, config=cfg, norm_scale=scale, norm_eps=1e-5)
    ref = higgs_matmul_reference(rms_norm(x, scale, 1e-5).astype(jnp.float32), w)
    assert rel_err(y, ref) < 2e-2


def test_model_pre_norms_on_both_routes(monkeypatch):
    """The Flax model hands its pre-norms to `linear` (q/k/v, gate/up, lm_head). On the Pallas
    path (interpret, p = 1, h = 512) XLA normalises by default; with ``Config.norm="kernel"``
    the rotation kernels of qkv, gate_up and the lm_head normalise (those of o and down have
    no norm), and the logits are the same up to the norm's f32 summation order."""
    from benchmarks import decode_bench as db
    from higgs_jax.config import HiggsConfig
    from higgs_jax.fuse import fuse_projections
    from higgs_jax.models.llama import LlamaConfig, forward, random_params
    from higgs_jax.params import KERNEL_PATTERN, Rule, quantize_params

    config = LlamaConfig(
        vocab_size=64, hidden_size=512, intermediate_size=1024, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=128, rope_theta=1000.0, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    params = random_params(config, jax.random.key(0))
    assert "lm_head" in params
    spec = HiggsConfig(bits=4, p=1, hadamard_size=512)
    q, _ = quantize_params(params, (Rule(r"embed_tokens", None), Rule(KERNEL_PATTERN, spec)))
    q, _ = fuse_projections(q)
    tok = jax.random.randint(jax.random.key(1), (1, 1), 0, config.vocab_size, jnp.int32)
    calls = []
    real = rotate.rotate

    def spy(*a, norm=None, **kw):
        calls.append(norm is not None)
        return real(*a, norm=norm, **kw)

    monkeypatch.setattr(rotate, "rotate", spy)
    monkeypatch.setattr(wrapper, "default_config", wrapper.default_config)
    monkeypatch.setattr(wrapper, "nk_config", wrapper.nk_config)

    def logits(mode, **options):
        jax.clear_caches()  # the wrapper's jitted entry point caches traces across configs
        calls.clear()
        if options:
            db.apply_kernel_options(options)
        with db.linear_implementation(mode):
            return jax.jit(lambda p, t: forward(p, t, config, dtype=jnp.float32)[0])(q, tok)

    a = logits("xla")
    b = logits("interpret")  # the default: XLA normalises, the rotation kernel rotates
    assert sorted(calls) == [False] * 5  # one trace per weight shape
    assert rel_err(b, a) < 1e-2  # five 4-bit kernel matmuls against the XLA decode
    c = logits("interpret", norm="kernel")
    # qkv, gate_up and lm_head normalise in the rotation kernel, o and down have no norm
    assert sorted(calls) == [False, False, True, True, True]
    assert rel_err(c, b) < 1e-4  # only where the norm is computed differs


def test_rotation_norm_loop_beyond_the_unrolled_windows(monkeypatch):
    """Rows of more than MAX_UNROLLED_NORM_BLOCKS windows sum their squares in a loop: the same
    operand as the unrolled loads."""
    w = _weight(1536, 64, 16, 512)
    cfg = Config(block_n=64, block_k=512, split_k=2, path="fma", rotation="kernel", norm="kernel")
    x, scale = _norm_case(3, 1536, jnp.float32, seed=5)
    a, _ = wrapper.prepare_activations(x, w, cfg, 3, jnp.float32, True, norm=(scale, 1e-5))
    monkeypatch.setattr(rotate, "MAX_UNROLLED_NORM_BLOCKS", 1)
    b, _ = wrapper.prepare_activations(x, w, cfg, 3, jnp.float32, True, norm=(scale, 1e-5))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
