"""Inference-time fusion of shared-input projections (higgs_jax.fuse) and the model's fused path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax.config import HiggsConfig
from higgs_jax.fuse import concat_columns, fuse_projections, why_not_fusable
from higgs_jax.models.llama import LlamaConfig, forward, random_params
from higgs_jax.params import default_rules, dequantize_params, quantize_params
from higgs_jax.qtensor import dequantize
from higgs_jax.quantize import quantize

SMALL = LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=1000.0,
    max_position_embeddings=64,
)
BIASED = dataclasses.replace(SMALL, attention_bias=True, attention_out_bias=True, mlp_bias=True)
fwd = jax.jit(forward, static_argnums=2)


def _tokens(config, seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 7), 0, config.vocab_size, jnp.int32)


@pytest.mark.parametrize("config", [SMALL, BIASED], ids=["nobias", "bias"])
def test_dense_fused_model_is_the_same_function(config):
    params = random_params(config, jax.random.key(0))
    fused, report = fuse_projections(params)
    assert [r["fused"] for r in report] == [True] * 4  # 2 layers x (qkv, gate_up)
    attn, mlp = fused["layers_0"]["attn"], fused["layers_0"]["mlp"]
    assert set(attn) == {"qkv_proj", "o_proj"} and set(mlp) == {"gate_up_proj", "down_proj"}
    assert attn["qkv_proj"]["kernel"].shape == (64, config.q_dim + 2 * config.kv_dim)
    assert ("bias" in attn["qkv_proj"]) == config.attention_bias
    tok = _tokens(config)
    a, _ = fwd(params, tok, config)
    b, _ = fwd(fused, tok, config)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    # the input tree is not modified
    assert "q_proj" in params["layers_0"]["attn"]


def test_quantized_fused_model_is_the_same_function():
    params = random_params(SMALL, jax.random.key(1))
    q, _ = quantize_params(params, default_rules(HiggsConfig(bits=4, p=2, hadamard_size=32)))
    fused, report = fuse_projections(q)
    assert all(r["fused"] for r in report)
    tok = _tokens(SMALL, 1)
    a, _ = fwd(q, tok, SMALL)
    b, _ = fwd(fused, tok, SMALL)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)
    # the fused weight dequantizes to the concatenation of the three
    lp = q["layers_1"]["attn"]
    want = np.concatenate(
        [np.asarray(dequantize(lp[n]["kernel"])) for n in ("q_proj", "k_proj", "v_proj")], axis=1
    )
    got = np.asarray(dequantize(fused["layers_1"]["attn"]["qkv_proj"]["kernel"]))
    np.testing.assert_array_equal(got, want)


def test_concat_keeps_outliers_and_signs():
    key = jax.random.key(2)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (48, n)) for i, n in enumerate((16, 8))]
    spec = HiggsConfig(bits=3, p=1, hadamard_size=16, random_signs=True)
    qs = [quantize(w, spec, axis=0, key=jax.random.key(5)) for w in ws]  # same key -> same signs
    qs[1] = dataclasses.replace(
        qs[1],
        outlier_rows=jnp.array([3, 40], jnp.int32),
        outlier_cols=jnp.array([0, 7], jnp.int32),
        outlier_values=jnp.array([2.5, -1.0], jnp.float32),
    )
    fused = concat_columns(qs)
    assert fused.shape == (48, 24)
    want = np.concatenate([np.asarray(dequantize(t)) for t in qs], axis=1)
    np.testing.assert_allclose(np.asarray(dequantize(fused)), want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(fused.outlier_cols), [16, 23])


def test_unfusable_groups_are_left_and_reported():
    params = random_params(SMALL, jax.random.key(3))
    rules = (
        (r"layers_0/attn/k_proj/kernel$", HiggsConfig(bits=2, p=1, hadamard_size=32)),
        *default_rules(HiggsConfig(bits=4, p=1, hadamard_size=32)),
    )
    q, _ = quantize_params(params, rules)
    fused, report = fuse_projections(q)
    bad = [r for r in report if not r["fused"]]
    assert [r["layer"] for r in bad] == ["layers_0/attn"]
    assert "grid" in bad[0]["reason"]
    assert set(fused["layers_0"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "qkv_proj" in fused["layers_1"]["attn"]
    tok = _tokens(SMALL, 2)
    np.testing.assert_allclose(
        np.asarray(fwd(fused, tok, SMALL)[0]), np.asarray(fwd(q, tok, SMALL)[0]), rtol=1e-4, atol=1e-4
    )


def test_why_not_fusable_reasons():
    key = jax.random.key(4)
    w = jax.random.normal(key, (32, 16))
    a = quantize(w, HiggsConfig(bits=4, p=1, hadamard_size=16, random_signs=True), axis=0, key=jax.random.key(0))
    b = quantize(w, HiggsConfig(bits=4, p=1, hadamard_size=16, random_signs=True), axis=0, key=jax.random.key(1))
    c = quantize(w, HiggsConfig(bits=4, p=1, hadamard_size=16), axis=0)
    assert "different random signs" in why_not_fusable([a, b])
    assert "signs on some" in why_not_fusable([a, c])
    assert "mixed leaf types" in why_not_fusable([c, w])
    assert "mixed dtypes" in why_not_fusable([w, w.astype(jnp.bfloat16)])
    assert "different K" in why_not_fusable([c, quantize(w[:16], HiggsConfig(bits=4, p=1, hadamard_size=16), axis=0)])
    assert why_not_fusable([w, w]) is None and why_not_fusable([c, c]) is None
    with pytest.raises(ValueError, match="different random signs"):
        concat_columns([a, b])
    with pytest.raises(ValueError, match="at least two"):
        concat_columns([c])


def test_partial_bias_is_filled_not_dropped():
    params = random_params(SMALL, jax.random.key(5))
    params["layers_0"]["mlp"]["up_proj"]["bias"] = jnp.arange(96, dtype=jnp.float32)
    fused, _ = fuse_projections(params)
    bias = np.asarray(fused["layers_0"]["mlp"]["gate_up_proj"]["bias"])
    np.testing.assert_array_equal(bias, np.concatenate([np.zeros(96), np.arange(96)]))
    tok = _tokens(SMALL, 3)
    np.testing.assert_allclose(
        np.asarray(fwd(fused, tok, SMALL)[0]), np.asarray(fwd(params, tok, SMALL)[0]), rtol=1e-5, atol=1e-5
    )


def test_fuse_bad_input():
    with pytest.raises(ValueError, match="no 'layers_\\*' blocks"):
        fuse_projections({"embed_tokens": {}})
    params = random_params(SMALL, jax.random.key(6))
    params["layers_0"]["attn"]["qkv_proj"] = {"kernel": jnp.zeros((64, 128))}
    with pytest.raises(ValueError, match="has both 'qkv_proj'"):
        fuse_projections(params)


def test_kernel_packed_weights_fuse_to_the_repacked_concatenation():
    from pallas_kernels.higgs_matmul import higgs_matmul_pallas, repack

    key = jax.random.key(7)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (200, n)) for i, n in enumerate((64, 32, 32))]
    spec = HiggsConfig(bits=3, p=2, hadamard_size=64, group_size=64)  # 6-bit codes: a real bit shuffle
    qs = [quantize(w, spec, axis=0) for w in ws]
    fused = concat_columns([repack(t) for t in qs])
    ref = repack(concat_columns(qs))
    np.testing.assert_array_equal(np.asarray(fused.words), np.asarray(ref.words))
    np.testing.assert_array_equal(np.asarray(fused.scales), np.asarray(ref.scales))
    x = jax.random.normal(key, (3, 200), jnp.float32)
    y = higgs_matmul_pallas(x, fused, interpret=True)
    parts = [higgs_matmul_pallas(x, repack(t), interpret=True) for t in qs]
    np.testing.assert_allclose(
        np.asarray(y), np.concatenate([np.asarray(p) for p in parts], axis=1), rtol=1e-5, atol=1e-5
    )


def test_prepare_for_inference():
    from pallas_kernels.higgs_matmul import KernelPackedWeight

    from higgs_jax.fuse import prepare_for_inference
    from higgs_jax.qtensor import HiggsTensor

    params = random_params(SMALL, jax.random.key(8))
    rules = (
        (r"layers_0/mlp/down_proj/kernel$", HiggsConfig(bits=2, p=4, hadamard_size=32)),
        *default_rules(HiggsConfig(bits=4, p=2, hadamard_size=64)),  # g = 64: kernel-ready
    )
    q, _ = quantize_params(params, rules)
    # CPU, "auto": no repack, only fusion
    prep, report = prepare_for_inference(q)
    assert all(r["fused"] for r in report)
    assert isinstance(prep["layers_0"]["attn"]["qkv_proj"]["kernel"], HiggsTensor)
    tok = _tokens(SMALL, 4)
    np.testing.assert_allclose(
        np.asarray(fwd(prep, tok, SMALL)[0]), np.asarray(fwd(q, tok, SMALL)[0]), rtol=1e-4, atol=1e-4
    )
    # forced kernel layout: supported grids repacked (then fused), p=4 left as a HiggsTensor
    prep, _ = prepare_for_inference(q, kernel_layout=True)
    assert isinstance(prep["layers_0"]["attn"]["qkv_proj"]["kernel"], KernelPackedWeight)
    assert isinstance(prep["layers_0"]["mlp"]["down_proj"]["kernel"], HiggsTensor)
    assert isinstance(prep["layers_1"]["attn"]["o_proj"]["kernel"], KernelPackedWeight)
    # K = 96 gets h = g = 48, not a multiple of 32 p = 64: the kernel can't take it, XLA path
    down = prep["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(down, HiggsTensor) and down.group_size == 48
    unfused, report = prepare_for_inference(q, fuse=False, kernel_layout=False)
    assert report == [] and "q_proj" in unfused["layers_0"]["attn"]
    with pytest.raises(ValueError, match="kernel_layout must be"):
        prepare_for_inference(q, kernel_layout="yes")


def test_prepare_for_inference_nk16(caplog):
    """kernel_layout="nk16": weights are repacked, fused, then every weight the nk path takes is
    in the nk16 layout with the same codes; the rest stays in the default layout and is logged
    with the reason. The converted fused weight computes the same product (interpret mode)."""
    import logging

    from pallas_kernels.higgs_matmul import higgs_matmul_pallas
    from pallas_kernels.higgs_matmul.reference import higgs_matmul_reference
    from pallas_kernels.higgs_matmul.repack import kernel_codes

    from higgs_jax.fuse import prepare_for_inference

    cfg = dataclasses.replace(
        SMALL, hidden_size=512, intermediate_size=1024, num_layers=1, num_heads=8, num_kv_heads=4,
        head_dim=64,
    )
    params = random_params(cfg, jax.random.key(9))
    rules = (
        (r"o_proj/kernel$", HiggsConfig(bits=4, p=2, hadamard_size=512, group_size=512)),
        *default_rules(HiggsConfig(bits=4, p=1, hadamard_size=512, group_size=512)),
    )
    q, _ = quantize_params(params, rules)
    kn, _ = prepare_for_inference(q, kernel_layout=True)
    with caplog.at_level(logging.INFO, logger="higgs_jax.fuse"):
        nk, report = prepare_for_inference(q, kernel_layout="nk16")
    assert all(r["fused"] for r in report)
    for blk, name in (("attn", "qkv_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")):
        a, b = nk["layers_0"][blk][name]["kernel"], kn["layers_0"][blk][name]["kernel"]
        assert (a.layout, b.layout) == ("nk16", "kn"), name
        np.testing.assert_array_equal(np.asarray(kernel_codes(a)), np.asarray(kernel_codes(b)))
    o = nk["layers_0"]["attn"]["o_proj"]["kernel"]
    assert o.layout == "kn" and o.p == 2
    assert "nk16 layout: 3 weights converted, 1 kept" in caplog.text
    assert "o_proj" in caplog.text and "p=2 (nk16 holds p = 1 codes)" in caplog.text
    w = nk["layers_0"]["attn"]["qkv_proj"]["kernel"]
    x = jax.random.normal(jax.random.key(3), (16, 512), jnp.bfloat16)
    y = higgs_matmul_pallas(x, w, interpret=True)
    r = higgs_matmul_reference(x.astype(jnp.float32), kn["layers_0"]["attn"]["qkv_proj"]["kernel"])
    assert float(jnp.linalg.norm(y.astype(jnp.float32) - r) / jnp.linalg.norm(r)) < 1e-2


def test_prepare_for_inference_batch_size_picks_the_layout(monkeypatch):
    """kernel_layout="auto" with a batch_size hint: on a GPU (simulated here by the compute
    capability the check reads) batch >= 4 gets the nk16 layout, batch 1 the default layout; off
    the GPU nothing is repacked; bad hints are named."""
    from pallas_kernels import _compat

    from higgs_jax import fuse

    cfg = dataclasses.replace(
        SMALL, hidden_size=512, intermediate_size=1024, num_layers=1, num_heads=8, num_kv_heads=4,
        head_dim=64,
    )
    q, _ = quantize_params(
        random_params(cfg, jax.random.key(11)),
        default_rules(HiggsConfig(bits=4, p=1, hadamard_size=512, group_size=512)),
    )
    cpu, _ = fuse.prepare_for_inference(q, batch_size=16)
    assert not hasattr(cpu["layers_0"]["attn"]["qkv_proj"]["kernel"], "layout")  # a HiggsTensor
    monkeypatch.setattr(_compat, "gpu_compute_capability", lambda *a, **k: (9, 0))
    for batch, layout in ((1, "kn"), (None, "kn"), (fuse.NK16_MIN_BATCH, "nk16"), (16, "nk16")):
        out, _ = fuse.prepare_for_inference(q, batch_size=batch)
        assert out["layers_0"]["mlp"]["down_proj"]["kernel"].layout == layout, batch
    # explicit layouts ignore the hint
    out, _ = fuse.prepare_for_inference(q, kernel_layout=True, batch_size=16)
    assert out["layers_0"]["mlp"]["down_proj"]["kernel"].layout == "kn"
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match=f"batch_size must be None or a positive int, got {bad!r}"):
            fuse.prepare_for_inference(q, batch_size=bad)


@pytest.mark.gpu
@pytest.mark.skipif(
    not any(d.platform == "gpu" for d in jax.devices()), reason="needs an NVIDIA GPU"
)
@pytest.mark.parametrize("batch", [1, 16])
def test_gpu_model_runs_on_nk16_weights(batch):
    """The model with prepare_for_inference(kernel_layout="nk16") params (the nk path's kernels,
    M = batch x 7 rows) gives the logits of the XLA path on the same quantized weights."""
    from higgs_jax.fuse import prepare_for_inference

    cfg = dataclasses.replace(
        SMALL, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8, num_kv_heads=4,
        head_dim=64,
    )
    params = random_params(cfg, jax.random.key(10))
    q, _ = quantize_params(params, default_rules(HiggsConfig(bits=4, p=1, hadamard_size=512, group_size=512)))
    nk, _ = prepare_for_inference(q, kernel_layout="nk16")
    assert nk["layers_1"]["mlp"]["down_proj"]["kernel"].layout == "nk16"
    xla, _ = prepare_for_inference(q, kernel_layout=False)
    tok = jax.random.randint(jax.random.key(batch), (batch, 7), 0, cfg.vocab_size, jnp.int32)
    a = np.asarray(fwd(nk, tok, cfg)[0], np.float64)
    b = np.asarray(fwd(xla, tok, cfg)[0], np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2
