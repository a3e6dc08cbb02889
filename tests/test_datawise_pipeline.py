"""Data-aware pipeline: per-layer GPTQ / QuantEase to HiggsTensor, calibration, Sigma cache, CLI.

Objective: tr(E^T Sigma E) / tr(W^T Sigma W), E = W_hat - W, Sigma = X^T X (Flax (K, N) kernels).
Per-layer tests use small random problems with a few large-norm input channels (as real
activations have); pipeline tests use the embedded stories260k model and its TinyStories text
(calibration on the second half, perplexity on the first half).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax import packing
from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig
from higgs_jax.datawise import calibration as cal
from higgs_jax.datawise.pipeline import (
    DatawiseLayerReport,
    can_share_solve,
    datawise_plan,
    hessian_error,
    plan_datawise,
    quantize_datawise,
    quantize_datawise_shared,
    quantize_params_datawise,
)
from higgs_jax.datawise.specs import GPTQConfig, QuantEaseConfig
from higgs_jax.matmul import linear
from higgs_jax.params import dequantize_params, plan_quantization, quantize_params
from higgs_jax.qtensor import HiggsTensor, dequantize, unpack
from higgs_jax.quantize import quantize_with_error

K, N = 128, 24

BASES = {
    "higgs_p1_3b": HiggsConfig(bits=3, p=1, hadamard_size=64),
    "higgs_p1_2b_signs": HiggsConfig(bits=2, p=1, hadamard_size=32, random_signs=True),
    "higgs_p2_4b": HiggsConfig(bits=4, p=2, hadamard_size=64),
    "rtn_3b": RTNConfig(bits=3, group_size=32),
    "nf4": NF4Config(block_size=32),
}
METHODS = {
    "gptq": lambda b: GPTQConfig(b),
    "quantease_gptq_init": lambda b: QuantEaseConfig(b, num_sweeps=4),
    "quantease_rtn_init": lambda b: QuantEaseConfig(b, num_sweeps=4, init="rtn"),
}


def problem(seed: int = 0, k: int = K, n: int = N, rank: int | None = None):
    """(W (k, n), Sigma (k, k)): Sigma from samples with 4 outlier channels (rank-limited if asked)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rank or 4 * k, k)).astype(np.float32)
    x[:, rng.choice(k, 4, replace=False)] *= 20.0
    w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(x.T @ x / x.shape[0])


# ----------------------------------------------------------------------------- per layer


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("base", sorted(BASES))
def test_never_worse_than_datafree_rounding(base, method):
    w, sigma = problem(seed=len(base) + len(method))
    spec = METHODS[method](BASES[base])
    qt, info = quantize_datawise(w, sigma, spec, key=jax.random.key(3))
    ref, t2_ref = quantize_with_error(w, BASES[base], axis=0, key=jax.random.key(3))
    # The report's numbers are the real errors of the two tensors.
    h_new = hessian_error(w, dequantize(qt, jnp.float32), sigma)
    h_free = hessian_error(w, dequantize(ref, jnp.float32), sigma)
    assert info.hessian_error == pytest.approx(h_new, rel=1e-4)
    assert info.hessian_error_datafree == pytest.approx(h_free, rel=1e-4)
    assert info.t2_datafree == pytest.approx(t2_ref, rel=1e-6)
    assert h_new <= h_free * (1 + 1e-4)
    # With strong outlier channels the data-aware gain is real, not a float tie.
    assert h_new < 0.97 * h_free


@pytest.mark.parametrize("base", sorted(BASES))
def test_same_layout_scales_and_signs_as_datafree(base):
    w, sigma = problem(seed=5)
    qt, _ = quantize_datawise(
        w, sigma, QuantEaseConfig(BASES[base], num_sweeps=2), key=jax.random.key(3)
    )
    ref = quantize_with_error(w, BASES[base], axis=0, key=jax.random.key(3))[0]
    qt.validate()
    assert isinstance(qt, HiggsTensor)
    for f in ("shape", "dtype", "grid", "hadamard_size", "group_size", "k_pad", "contraction_axis"):
        assert getattr(qt, f) == getattr(ref, f), f
    assert qt.scales.dtype == ref.scales.dtype
    np.testing.assert_array_equal(np.asarray(qt.scales), np.asarray(ref.scales))
    if ref.signs is None:
        assert qt.signs is None
    else:
        np.testing.assert_array_equal(np.asarray(qt.signs), np.asarray(ref.signs))
    assert qt.codes.shape == ref.codes.shape and qt.codes.dtype == jnp.uint32
    assert qt.storage_bits == ref.storage_bits
    # Codes really differ from nearest rounding (the method did something) and lie on the grid.
    codes = np.asarray(unpack(qt))
    assert codes.max() < qt.grid.n and np.any(codes != np.asarray(unpack(ref)))
    # Forward pass through the quantized-tensor path equals the dense dequantized weight.
    x = jax.random.normal(jax.random.key(1), (3, 5, K), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(linear(x, qt)), np.asarray(x @ dequantize(qt, jnp.float32)), rtol=2e-4, atol=2e-4
    )


SHARED_SPECS = {
    "gptq_higgs_p2": GPTQConfig(HiggsConfig(bits=3, p=2, hadamard_size=64)),
    "quantease_higgs_p1_g32": QuantEaseConfig(
        HiggsConfig(bits=3, p=1, hadamard_size=128, group_size=32), num_sweeps=3
    ),
    "gptq_rtn": GPTQConfig(RTNConfig(bits=3, group_size=32)),
}


@pytest.mark.parametrize("name", sorted(SHARED_SPECS))
def test_shared_solve_equals_per_kernel(name):
    # Kernels reading one input (q/k/v) solved as one column-concatenated problem: every column is
    # independent given Sigma, so codes, scales and reported errors equal the per-kernel solves.
    spec = SHARED_SPECS[name]
    w, sigma = problem(seed=3, n=40)
    ws = [w[:, :24], w[:, 24:32], w[:, 32:]]
    for wi, (qt, info) in zip(ws, quantize_datawise_shared(ws, sigma, spec)):
        q1, i1 = quantize_datawise(wi, sigma, spec)
        assert qt.shape == q1.shape == wi.shape
        np.testing.assert_array_equal(np.asarray(unpack(qt)), np.asarray(unpack(q1)))
        np.testing.assert_array_equal(np.asarray(qt.scales), np.asarray(q1.scales))
        assert info.hessian_error == pytest.approx(i1.hessian_error, rel=1e-5)
        assert info.hessian_error_datafree == pytest.approx(i1.hessian_error_datafree, rel=1e-5)
        assert info.t2_datafree == pytest.approx(i1.t2_datafree, rel=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        QuantEaseConfig(HiggsConfig(bits=3, p=1, hadamard_size=64), outlier_fraction=0.01),
        GPTQConfig(HiggsConfig(bits=3, p=1, hadamard_size=64, random_signs=True)),
        HiggsConfig(bits=3, p=1, hadamard_size=64),
    ],
)
def test_shared_solve_refuses_layer_specific_specs(spec):
    w, sigma = problem()
    assert not can_share_solve(spec)
    with pytest.raises(ValueError, match="cannot share"):
        quantize_datawise_shared([w, w], sigma, spec)


def test_shared_solve_bad_kernels():
    w, sigma = problem()
    spec = GPTQConfig(HiggsConfig(bits=3, p=1, hadamard_size=64))
    with pytest.raises(ValueError, match="one K"):
        quantize_datawise_shared([w, w[:64]], sigma, spec)
    with pytest.raises(ValueError, match="one K"):
        quantize_datawise_shared([], sigma, spec)


def test_torch_layout_axis1_matches_axis0():
    w, sigma = problem(seed=2)
    spec = GPTQConfig(BASES["higgs_p1_3b"])
    qt0, i0 = quantize_datawise(w, sigma, spec)
    qt1, i1 = quantize_datawise(w.T, sigma, spec, axis=1)
    assert qt1.shape == (N, K) and qt1.contraction_axis == 1
    np.testing.assert_array_equal(np.asarray(qt0.codes), np.asarray(qt1.codes))
    np.testing.assert_allclose(np.asarray(dequantize(qt1)), np.asarray(dequantize(qt0)).T)
    assert i0.hessian_error == pytest.approx(i1.hessian_error, rel=1e-5)


@pytest.mark.parametrize("base", ["higgs_p1_3b", "higgs_p1_2b_signs", "rtn_3b"])
def test_outliers_sparse_in_original_domain_and_counted(base, tmp_path):
    from higgs_jax.checkpoints.orbax import load_params, save_params

    w, sigma = problem(seed=7)
    plain, info_plain = quantize_datawise(
        w, sigma, QuantEaseConfig(BASES[base], num_sweeps=4), key=jax.random.key(3)
    )
    spec = QuantEaseConfig(BASES[base], num_sweeps=4, outlier_fraction=0.02, outlier_iters=4)
    qt, info = quantize_datawise(w, sigma, spec, key=jax.random.key(3))
    k_out = round(0.02 * K * N)
    assert info.num_outliers == qt.num_outliers == k_out
    assert qt.outlier_rows.dtype == jnp.int32 and qt.outlier_values.dtype == jnp.float32
    pos = np.asarray(qt.outlier_rows) * N + np.asarray(qt.outlier_cols)
    assert len(np.unique(pos)) == k_out and np.asarray(qt.outlier_rows).max() < K
    # S is sparse in the ORIGINAL domain: removing it changes exactly k entries of W_hat.
    no_s = dataclasses.replace(qt, outlier_rows=None, outlier_cols=None, outlier_values=None)
    diff = np.asarray(dequantize(qt, jnp.float32) - dequantize(no_s, jnp.float32))
    assert np.count_nonzero(diff) <= k_out
    # Every stored bit counted: 32 + 32 + 32 bits per outlier on top of codes + scales.
    assert qt.storage_bits == plain.storage_bits + 96 * k_out
    assert qt.bits_per_weight == pytest.approx(plain.bits_per_weight + 96 * k_out / (K * N))
    # The alternation starts from the plain solution and every step is monotone.
    assert info.hessian_error <= info_plain.hessian_error * (1 + 1e-3)
    assert info.hessian_error < info.hessian_error_datafree
    x = jax.random.normal(jax.random.key(1), (4, K), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(linear(x, qt)), np.asarray(x @ dequantize(qt, jnp.float32)), rtol=2e-4, atol=2e-4
    )
    # Orbax round trip keeps the outlier leaves bit for bit.
    save_params(tmp_path / "ck", {"layer": {"kernel": qt}})
    back, _ = load_params(tmp_path / "ck")
    qb = back["layer"]["kernel"]
    assert qb.num_outliers == k_out and qb.bits_per_weight == qt.bits_per_weight
    for f in ("codes", "scales", "outlier_rows", "outlier_cols", "outlier_values"):
        np.testing.assert_array_equal(np.asarray(getattr(qb, f)), np.asarray(getattr(qt, f)))
    np.testing.assert_array_equal(np.asarray(dequantize(qb)), np.asarray(dequantize(qt)))


@pytest.mark.parametrize("method", ["gptq", "quantease_gptq_init"])
def test_singular_sigma_is_dampened_and_reported(method):
    w, sigma = problem(seed=4, rank=K // 4)  # 32 samples for K = 128: rank-deficient
    sigma = sigma.at[:3, :].set(0.0).at[:, :3].set(0.0)  # three dead inputs
    qt, info = quantize_datawise(w, sigma, METHODS[method](BASES["higgs_p1_3b"]))
    assert info.num_dead_inputs == 3
    assert not math.isfinite(info.sigma_condition) or info.sigma_condition > 1e7
    assert "dead inputs" in info.notes and "dampening" in info.notes
    assert info.damp_added is not None and info.damp_added > 0
    assert np.all(np.isfinite(np.asarray(dequantize(qt))))
    assert info.hessian_error <= info.hessian_error_datafree * (1 + 1e-4)


def test_padded_k_is_well_posed():
    # K = 100 with h = 64 pads to 128; padded inputs get a tiny diagonal.
    w, sigma = problem(seed=9, k=100)
    base = HiggsConfig(bits=3, p=1, hadamard_size=64, indivisible="pad")
    qt, info = quantize_datawise(w, sigma, QuantEaseConfig(base, num_sweeps=3))
    assert qt.k_pad == 128 and qt.shape == (100, N)
    assert info.hessian_error < info.hessian_error_datafree


@pytest.mark.parametrize("fraction", [0, 0.0, 0.5, 0.7, -0.01, float("nan"), float("inf"), True])
def test_outlier_fraction_outside_open_interval(fraction):
    with pytest.raises(
        ValueError,
        match=r"outlier_fraction must be a number in \(0, 0.5\), got "
        + repr(fraction).replace("(", r"\("),
    ):
        QuantEaseConfig(BASES["rtn_3b"], outlier_fraction=fraction)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GPTQConfig("higgs"), "base must be"),
        (lambda: GPTQConfig(BASES["rtn_3b"], damp=-1.0), "damp must be"),
        (lambda: GPTQConfig(BASES["rtn_3b"], damp=float("nan")), "damp must be"),
        (lambda: GPTQConfig(BASES["rtn_3b"], block_size=0), "block_size must be"),
        (lambda: QuantEaseConfig(BASES["rtn_3b"], num_sweeps=-1), "num_sweeps must be"),
        (lambda: QuantEaseConfig(BASES["rtn_3b"], init="random"), "init must be"),
        (lambda: QuantEaseConfig(BASES["rtn_3b"], outlier_iters=0), "outlier_iters must be"),
    ],
)
def test_bad_specs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("sigma", "spec", "match"),
    [
        (
            jnp.eye(K - 1),
            GPTQConfig(BASES["rtn_3b"]),
            r"sigma must have shape \(K, K\) = \(128, 128\)",
        ),
        (jnp.eye(K).at[0, 1].set(jnp.nan), GPTQConfig(BASES["rtn_3b"]), "NaN/Inf"),
        (jnp.eye(K), BASES["rtn_3b"], "spec must be a GPTQConfig or QuantEaseConfig"),
    ],
)
def test_bad_layer_inputs(sigma, spec, match):
    w, _ = problem()
    with pytest.raises(ValueError, match=match):
        quantize_datawise(w, sigma, spec)


def test_specs_are_hashable_and_describe():
    a = QuantEaseConfig(BASES["higgs_p1_3b"], outlier_fraction=0.01)
    assert hash(a) == hash(QuantEaseConfig(BASES["higgs_p1_3b"], outlier_fraction=0.01))
    assert a.method == "quantease" and "outliers=0.01" in a.describe()
    assert GPTQConfig(BASES["nf4"]).method == "gptq" and a.grid == BASES["higgs_p1_3b"].grid


# ----------------------------------------------------------------------------- calibration


def test_sample_windows_distinct_seeded_and_too_short():
    toks = np.arange(1000, dtype=np.int32)
    a = cal.sample_windows(toks, 8, 64, seed=1)
    assert a.shape == (8, 64) and len(set(a[:, 0])) == 8
    np.testing.assert_array_equal(a[:, 1:] - a[:, :-1], 1)  # contiguous windows of the stream
    np.testing.assert_array_equal(a, cal.sample_windows(toks, 8, 64, seed=1))
    assert not np.array_equal(a, cal.sample_windows(toks, 8, 64, seed=2))
    with pytest.raises(
        ValueError, match=r"too short: 100 tokens give 0 distinct windows of seqlen=128"
    ):
        cal.sample_windows(toks[:100], 4, 128)
    with pytest.raises(ValueError, match="num_samples=20 were requested"):
        cal.sample_windows(toks[:80], 20, 64)
    with pytest.raises(ValueError, match="seqlen must be an integer >= 2"):
        cal.sample_windows(toks, 4, 1)


def test_sigma_cache_roundtrip_and_mismatch(tmp_path):
    sig = {"layers_0.attn_in": np.eye(4, dtype=np.float32) * 3}
    meta = {"model": "abc", "seqlen": 128, "num_samples": 8}
    cal.save_sigmas(tmp_path, sig, meta)
    back, m = cal.load_sigmas(tmp_path, meta)
    np.testing.assert_array_equal(back["layers_0.attn_in"], sig["layers_0.attn_in"])
    assert m["seqlen"] == 128
    with pytest.raises(
        ValueError, match=r"field 'seqlen' is 128 in the cache but 256 was requested"
    ):
        cal.load_sigmas(tmp_path, {**meta, "seqlen": 256})
    with pytest.raises(ValueError, match=r"field 'model'"):
        cal.load_sigmas(tmp_path, {"model": "other"})
    with pytest.raises(ValueError, match="holds no Sigma cache"):
        cal.load_sigmas(tmp_path / "nothing")


# ----------------------------------------------------------------------------- stories260k

CALIB = {"num_samples": 8, "seqlen": 128, "batch_size": 8}
BASE3 = HiggsConfig(bits=3, p=1, hadamard_size=64)


@pytest.fixture(scope="module")
def tiny():
    from higgs_jax.checkpoints import load_checkpoint
    from higgs_jax.evaluate import perplexity, tokenize_text
    from higgs_jax.quickstart import default_model_dir, default_text_file
    from higgs_jax.tokenizer import load_tokenizer

    params, config = load_checkpoint(default_model_dir())
    tok = load_tokenizer(default_model_dir(), config)
    tokens = tokenize_text(tok, default_text_file().read_text())
    half = len(tokens) // 2
    ev, calib = tokens[:half], tokens[half:]

    def ppl(p):
        return perplexity(
            dequantize_params(p),
            config,
            ev,
            seqlen=256,
            num_windows=40,
            batch_size=20,
            progress=False,
        ).ppl

    free, _ = quantize_params(params, (("(^|/)embed", None), (r"kernel$", BASE3)))
    return {
        "params": params,
        "config": config,
        "calib": calib,
        "ppl": ppl,
        "fp_ppl": ppl(params),
        "free_ppl": ppl(free),
    }


@pytest.fixture(scope="module")
def gptq_run(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("sigma")
    q, rep = quantize_params_datawise(
        tiny["params"],
        tiny["config"],
        tiny["calib"],
        GPTQConfig(BASE3),
        cache_dir=str(cache),
        sequential="block",
        **CALIB,
    )
    return q, rep, cache


def test_pipeline_gptq_3bit_perplexity(tiny, gptq_run):
    q, rep, _ = gptq_run
    ppl = tiny["ppl"](q)
    # Measured (CPU, 40 windows of 256): fp 4.13, data-free HIGGS 3b p1 h64 ~7.0, GPTQ ~5.7.
    assert math.isfinite(ppl)
    assert tiny["fp_ppl"] < ppl <= tiny["free_ppl"]
    assert ppl - tiny["fp_ppl"] < 0.8 * (tiny["free_ppl"] - tiny["fp_ppl"])
    layers = [r for r in rep.layers if isinstance(r, DatawiseLayerReport)]
    assert len(layers) == 7 * tiny["config"].num_layers
    assert all(r.method == "gptq" and r.hessian_error < r.hessian_error_datafree for r in layers)
    assert rep.calibration["num_samples"] == 8 and not rep.calibration["cache_hit"]
    assert "embed_tokens/embedding" in {r.path for r in rep.layers if r.method == "kept"}
    json.loads(rep.to_json())


def test_pipeline_shared_inputs_same_codes(tiny, gptq_run):
    # q/k/v and gate/up solved together (default) give the same tensors as one solve per kernel.
    q_shared, rep, _ = gptq_run
    q_single, rep1 = quantize_params_datawise(
        tiny["params"],
        tiny["config"],
        tiny["calib"],
        GPTQConfig(BASE3),
        sequential="block",
        share_inputs=False,
        **CALIB,
    )
    shared = {r.path for r in rep.layers if "solved with" in r.reason}
    assert len(shared) == 5 * tiny["config"].num_layers  # q, k, v, gate, up
    assert not any("solved with" in r.reason for r in rep1.layers)
    for path in shared:
        keys = path.split("/")
        a, b = q_shared, q_single
        for k in keys:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(unpack(a)), np.asarray(unpack(b)))


def test_pipeline_quantease_outliers_beats_datafree(tiny):
    # Outlier-aware QuantEase on the square attention kernels (one shape: cheap to compile),
    # data-free rounding elsewhere.
    spec = QuantEaseConfig(BASE3, num_sweeps=3, outlier_fraction=0.01, outlier_iters=2)
    rules = (("(^|/)embed", None), ("attn/(q|o)_proj", spec), (r"kernel$", BASE3))
    q, rep = quantize_params_datawise(
        tiny["params"], tiny["config"], tiny["calib"], rules, sequential="block", **CALIB
    )
    ppl = tiny["ppl"](q)
    assert math.isfinite(ppl) and tiny["fp_ppl"] < ppl < tiny["free_ppl"]
    for r in rep.layers:
        if "q_proj" in r.path or "o_proj" in r.path:
            qt = q[r.path.split("/")[0]]["attn"][r.path.split("/")[2]]["kernel"]
            assert r.method == "quantease" and qt.num_outliers == r.num_outliers == round(
                0.01 * 64 * 64
            )
            assert r.hessian_error < r.hessian_error_datafree
            free = plan_quantization({"k": jnp.zeros((64, 64))}, (("k", BASE3),))["k"]
            assert r.bits_per_weight == pytest.approx(free.bits_per_weight + 96 * 41 / 64**2)
        elif r.method != "kept":
            assert r.method == "higgs"


def test_sigma_cache_reused_and_checked(tiny, gptq_run):
    q1, _, cache = gptq_run
    meta = json.loads((cache / cal.META_FILE).read_text())
    assert meta["num_samples"] == 8 and meta["seqlen"] == 128 and meta["sequential"] == "block"
    assert meta["text_hash"] == cal.tokens_hash(tiny["calib"])
    q2, rep2 = quantize_params_datawise(
        tiny["params"],
        tiny["config"],
        tiny["calib"],
        GPTQConfig(BASE3),
        cache_dir=str(cache),
        sequential="block",
        **CALIB,
    )
    assert rep2.calibration["cache_hit"] and rep2.calibration["calibration_seconds"] == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(q1), jax.tree_util.tree_leaves(q2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="field 'num_samples'"):
        quantize_params_datawise(
            tiny["params"],
            tiny["config"],
            tiny["calib"],
            GPTQConfig(BASE3),
            cache_dir=str(cache),
            sequential="block",
            **{**CALIB, "num_samples": 4},
        )
    other = jax.tree_util.tree_map(lambda x: x * 1.01, tiny["params"])
    with pytest.raises(ValueError, match="field 'model'"):
        quantize_params_datawise(
            other,
            tiny["config"],
            tiny["calib"],
            GPTQConfig(BASE3),
            cache_dir=str(cache),
            sequential="block",
            **CALIB,
        )
    with pytest.raises(ValueError, match="field 'quantization'"):  # Sigma depends on the method
        quantize_params_datawise(
            tiny["params"],
            tiny["config"],
            tiny["calib"],
            GPTQConfig(BASE3, damp=0.1),
            cache_dir=str(cache),
            sequential="block",
            **CALIB,
        )


def test_dynamic_plan_composes_with_datawise(tiny):
    from higgs_jax.allocation import dynamic

    rules = (("(^|/)embed", None), (r"kernel$", BASE3))
    # Two options that share array shapes (bf16 vs f32 scales), so no new compilation is needed.
    options = (BASE3, dataclasses.replace(BASE3, scale_dtype="float32"))
    table = dynamic.error_table(tiny["params"], options, rules=rules)
    choices = np.arange(len(table.layers)) % 2
    plan = datawise_plan(
        dynamic.plan_from_choices(tiny["params"], table, choices, rules=rules), GPTQConfig
    )
    _q, rep = quantize_params_datawise(
        tiny["params"], tiny["config"], tiny["calib"], plan, sequential="block", **CALIB
    )
    got = {r.path: r for r in rep.layers}
    for i, (path, c) in enumerate(zip(table.layers, choices)):
        assert got[path].method == "gptq"
        assert got[path].bits_per_weight == pytest.approx(table.bits[i, c])
        assert got[path].hessian_error < got[path].hessian_error_datafree
    assert table.bits[0, 1] > table.bits[0, 0]


def test_mixed_rules_datafree_kept_and_datawise(tiny):
    # sequential="layer": the MLP inputs are measured with this block's attention already quantized.
    rules = (
        ("(^|/)embed", None),
        ("mlp/down_proj", None),
        ("attn/", BASE3),
        (r"kernel$", QuantEaseConfig(BASE3, num_sweeps=1, init="rtn")),
    )
    plan = plan_datawise(tiny["params"], rules)
    assert plan["layers_0/attn/q_proj/kernel"].spec == BASE3
    assert isinstance(plan["layers_0/mlp/up_proj/kernel"].spec, QuantEaseConfig)
    q, rep = quantize_params_datawise(
        tiny["params"], tiny["config"], tiny["calib"], plan, sequential="layer", **CALIB
    )
    got = {r.path: r.method for r in rep.layers}
    assert got["layers_1/attn/o_proj/kernel"] == "higgs"
    assert got["layers_1/mlp/gate_proj/kernel"] == "quantease"
    assert got["layers_1/mlp/down_proj/kernel"] == "kept"
    assert not isinstance(q["layers_1"]["mlp"]["down_proj"]["kernel"], HiggsTensor)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 100, "seqlen": 256}, "calibration text too short"),
        ({"seqlen": 1024}, "exceeds max_position_embeddings"),
        ({"sequential": "random"}, "sequential must be one of"),
    ],
)
def test_pipeline_bad_input(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_params_datawise(
            tiny["params"],
            tiny["config"],
            tiny["calib"][:300],
            GPTQConfig(BASE3),
            **{**CALIB, **kwargs},
        )


def test_datawise_spec_on_embedding_is_refused(tiny):
    rules = ((r"embed_tokens/embedding", GPTQConfig(BASE3)),)
    with pytest.raises(ValueError, match="data-aware methods need the layer's inputs"):
        quantize_params_datawise(tiny["params"], tiny["config"], tiny["calib"], rules, **CALIB)


def test_cli_quantize_gptq(tiny, tmp_path):
    from higgs_jax.checkpoints.orbax import load_params
    from higgs_jax.cli import main
    from higgs_jax.quickstart import default_model_dir, default_text_file

    out = tmp_path / "q"
    rc = main(
        [
            "quantize",
            "--model",
            str(default_model_dir()),
            "--out",
            str(out),
            "--method",
            "gptq",
            "--bits",
            "3",
            "--p",
            "1",
            "--hadamard-size",
            "64",
            "--calib",
            str(default_text_file()),
            "--calib-samples",
            "8",
            "--calib-seqlen",
            "128",
            "--sequential",
            "block",
        ]
    )
    assert rc == 0
    params, meta = load_params(out)
    assert isinstance(params["layers_0"]["attn"]["q_proj"]["kernel"], HiggsTensor)
    assert meta["spec"].startswith("GPTQ[HIGGS b=3 p=1")
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["calibration"]["num_samples"] == 8


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--method", "gptq", "--outliers", "0.01"], "--outliers needs --method quantease"),
        (["--method", "quantease", "--outliers", "0.5"], "outlier_fraction must be a number in"),
        (["--method", "quantease", "--calib", "/nonexistent.txt"], "does not exist"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, extra, match):
    from higgs_jax.cli import main
    from higgs_jax.quickstart import default_model_dir, default_text_file

    args = [
        "quantize",
        "--model",
        str(default_model_dir()),
        "--out",
        str(tmp_path / "q"),
        "--bits",
        "3",
        "--p",
        "1",
        "--hadamard-size",
        "64",
        "--calib",
        str(default_text_file()),
    ]
    assert main(args + extra) == 2
    assert match in capsys.readouterr().err


def test_packing_of_datawise_codes_roundtrips():
    w, sigma = problem(seed=11)
    qt, _ = quantize_datawise(w, sigma, GPTQConfig(BASES["higgs_p2_4b"]))
    codes = unpack(qt)
    np.testing.assert_array_equal(
        np.asarray(packing.pack_codes(codes, qt.code_bits)), np.asarray(qt.codes)
    )


@pytest.mark.slow
def test_benchmark_script_runs_on_tiny_model(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    from higgs_jax.quickstart import default_model_dir, default_text_file

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_datawise.py"
    spec = importlib.util.spec_from_file_location("smollm2_datawise", script)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "smollm2_datawise", mod)  # dataclasses look themselves up
    spec.loader.exec_module(mod)
    text = str(default_text_file())
    mod.main(
        [
            "--model",
            str(default_model_dir()),
            "--eval-text",
            text,
            "--calib-text",
            text,
            "--seqlen",
            "256",
            "--windows",
            "2",
            "--calib-samples",
            "4",
            "--calib-seqlen",
            "128",
            "--sweeps",
            "2",
            "--hadamard-size",
            "64",
            "--budgets",
            "3",
            "--families",
            "rtn,higgs,gptq,quantease",
            "--datawise-p",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    res = json.loads((tmp_path / "datawise.json").read_text())
    methods = {r["method"] for r in res["rows"]}
    assert {"fp32", "RTN 3b g128", "HIGGS p1 3b", "GPTQ p1 3b", "QuantEase p1 3b"} <= methods
    assert all(math.isfinite(r["ppl"]) for r in res["rows"])
    assert res["verdicts"] and res["verdicts"][0]["budget"] == "3"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.split()[1] == "QuantEase"  # the table is printed last


def test_benchmark_script_no_eval_times_quantization_only(tmp_path, capsys, monkeypatch):
    """--no-eval: data-aware rows keep bits, quantization/calibration/solve times and H-errors,
    with null perplexities; no verdict (no PPLs) and "-" in the printed table."""
    import importlib.util
    import sys
    from pathlib import Path

    from higgs_jax.quickstart import default_model_dir, default_text_file

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_datawise.py"
    spec = importlib.util.spec_from_file_location("smollm2_datawise", script)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "smollm2_datawise", mod)  # dataclasses look themselves up
    spec.loader.exec_module(mod)
    mod.main(
        [
            "--model",
            str(default_model_dir()),
            "--calib-text",
            str(default_text_file()),
            "--no-eval",
            "--windows",
            "1",
            "--seqlen",
            "64",
            "--calib-samples",
            "2",
            "--calib-seqlen",
            "64",
            "--sweeps",
            "1",
            "--outlier-iters",
            "1",
            "--hadamard-size",
            "64",
            "--budgets",
            "4",
            "--families",
            "gptq,quantease",
            "--out",
            str(tmp_path),
        ]
    )
    res = json.loads((tmp_path / "datawise.json").read_text())
    rows = [r for r in res["rows"] if r["budget"] == "4"]
    assert {r["family"] for r in rows} == {"gptq", "quantease"}
    assert all(r["ppl"] is None and r["dppl"] is None and r["eval_s"] is None for r in rows)
    assert all(r["quant_s"] > 0 and r["calib_s"] > 0 and r["solve_s"] > 0 for r in rows)
    assert all(0 < r["bits"] < 5 for r in rows)
    assert all(
        0 < r[k] < math.inf
        for r in rows
        for k in ("sum_hessian_error", "sum_hessian_error_datafree")
    )
    assert res["rows"][0]["ppl"] is None and res["env"]["evaluated"] is False
    assert res["verdicts"] == []
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[1] == "QuantEase" and last[-4:-2] == ["-", "-"]  # PPL, dPPL printed as "-"
