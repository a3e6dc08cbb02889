"""CPU tests of benchmarks/decode_bench.py on its tiny config (XLA path; Pallas in interpret mode)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import decode_bench as db
from higgs_jax.models import llama
from higgs_jax.qtensor import decode_rotated as decode_rotated_qt
from higgs_jax.quantize import expected_bits_per_weight

QUANTIZED = [v for v in db.DEFAULT_VARIANTS if db.VARIANTS[v] is not None]
BATCHES = (1,)  # batch > 1 and ascending batches: test_subprocess_mode_collects_child_results


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    argv = ["--tiny", "--in-process", "--layers", "1", "--no-check", "--out", str(out)]
    argv += ["--batches", *map(str, BATCHES)]
    return db.main(argv), out


@pytest.mark.parametrize("variant", db.DEFAULT_VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_row_for_every_variant_and_batch(bench, variant, batch):
    results, _ = bench
    rows = [r for r in results["rows"] if r["variant"] == variant and r["batch"] == batch]
    assert len(rows) == 1, results["errors"]
    r = rows[0]
    assert r["step_us"] > 0 and r["host_call_us"] > 0 and r["compile_plus_first_call_s"] > 0
    assert math.isclose(r["tokens_per_s"], batch / (r["step_us"] * 1e-6), rel_tol=1e-9)
    assert r["step_us_min"] <= r["step_us"] <= r["step_us_max"]
    assert 0 <= r["first_token"] < db.model_config(1, True).vocab_size
    if variant == "bf16":
        assert r["speedup_vs_bf16"] == pytest.approx(1.0)
    assert r["peak_bytes"] is None  # CPU: no allocator statistics


def test_no_errors_and_table_lists_all(bench):
    results, out = bench
    assert results["errors"] == []
    md = (out / "decode_bench.md").read_text()
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "variant" not in ln]
    assert len(table_rows) == len(db.DEFAULT_VARIANTS) * len(BATCHES)
    saved = json.loads((out / "decode_bench.json").read_text())
    assert len(saved["rows"]) == len(results["rows"])
    assert "REDUCED" in saved["meta"]["layers_note"]


@pytest.mark.parametrize("variant", QUANTIZED)
def test_layer_linear_bytes_match_the_layout(bench, variant):
    """Stored bytes of the quantized linears = expected bits/weight of each shape, summed."""
    results, _ = bench
    cfg = db.model_config(1, True)
    spec = db.variant_spec(variant)
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    want = sum(expected_bits_per_weight(s, spec) * s[0] * s[1] / 8 for s in shapes)
    row = next(r for r in results["rows"] if r["variant"] == variant)
    assert row["layer_linear_bytes"] == pytest.approx(want * cfg.num_layers)
    bf16 = next(r for r in results["rows"] if r["variant"] == "bf16")
    assert (
        row["params_bytes"] - row["layer_linear_bytes"]
        == bf16["params_bytes"] - bf16["layer_linear_bytes"]
    )  # embeddings, lm_head and norms stay bf16


def test_params_bytes_shrink_with_bits(bench):
    results, _ = bench
    size = {r["variant"]: r["params_bytes"] for r in results["rows"] if r["batch"] == 1}
    assert size["bf16"] > size["p2_4b"] > size["p2_3b"] > size["p2_2b"]


def test_check_kernel_and_dense_paths_agree_with_xla():
    """One decode step: Pallas (interpret) and the bf16 model on dequantized weights vs XLA."""
    args = db.parse_args(["--tiny", "--layers", "1", "--batches", "1"])
    rows = list(db.run_check(args))
    assert len(rows) == 1
    r = rows[0]
    assert r["finite"] and r["ok"]
    assert r["rel_err_kernel_vs_xla"] < db.CHECK_MAX_REL_ERR
    assert r["rel_err_dense_dequant_vs_xla"] < db.CHECK_MAX_REL_ERR


@pytest.mark.parametrize("variant", QUANTIZED)
def test_kernel_layout_leaf_decodes_like_the_higgs_tensor(variant):
    """The load-time repack (a bit shuffle for 3-bit p=2) keeps every decoded weight."""
    from pallas_kernels.higgs_matmul.reference import decode_rotated as decode_rotated_kw

    spec = db.variant_spec(variant)
    key = jax.random.key(3)
    qt = db._higgs_leaf(key, 512, 96, spec, False)
    qt.validate()
    kw = db._higgs_leaf(key, 512, 96, spec, True)
    np.testing.assert_array_equal(
        np.asarray(decode_rotated_kw(kw)), np.asarray(decode_rotated_qt(qt))
    )


def test_linear_implementation_restores_the_model_linear():
    original = llama.linear
    with pytest.raises(RuntimeError), db.linear_implementation("xla"):
        assert llama.linear is not original
        raise RuntimeError("boom")
    assert llama.linear is original


@pytest.mark.parametrize(
    "argv",
    [
        ["--variants", "bf16", "p9_4b"],
        ["--ctx", "500", "--cache-len", "512", "--reps", "32"],
        ["--batches", "0"],
        ["--layers", "0"],
        ["--reps", "0"],
    ],
)
def test_bad_arguments_raise_value_error(argv):
    with pytest.raises(ValueError):
        db.parse_args(argv)


def test_subprocess_mode_collects_child_results(tmp_path):
    argv = ["--tiny", "--layers", "1", "--batches", "2", "1", "--variants", "bf16", "--no-check"]
    results = db.main(argv + ["--out", str(tmp_path)])
    assert results["errors"] == []
    assert [(r["variant"], r["batch"]) for r in results["rows"]] == [("bf16", 1), ("bf16", 2)]
    assert all(r["step_us"] > 0 and r["tokens_per_s"] > 0 for r in results["rows"])
    assert results["meta"]["separate_processes"]
    assert results["meta"]["platform"] == "cpu"  # read from the child, not the parent's backend


def test_child_processes_get_every_option():
    """Each variant runs in its own interpreter: options that change what is timed must reach it."""
    args = db.parse_args(
        ["--tiny", "--layers", "1", "--batches", "1", "4", "--fuse", "--compile-cache", "/tmp/c"]
        + ["--quantize-lm-head"]
    )
    child = db.parse_args(db.child_argv(args, "p2_4b")[2:])
    names = ("fuse", "tiny", "layers", "batches", "ctx", "cache_len", "reps", "repeats")
    for name in names + ("quantize_lm_head",):
        assert getattr(child, name) == getattr(args, name), name
    assert child.compile_cache == "/tmp/c" and child.one == "p2_4b"
    plain = db.parse_args(db.child_argv(db.parse_args(["--tiny"]), "bf16")[2:])
    assert not plain.fuse and not plain.quantize_lm_head


def test_fused_variant_rows_say_so():
    args = db.parse_args(["--tiny", "--layers", "1", "--batches", "1", "--fuse", "--reps", "2"])
    rows = list(db.run_variant(args, "p2_4b"))
    assert rows and all(r["fused_projections"] for r in rows)


def test_kernel_options_parse_and_reject():
    from benchmarks import decode_bench

    assert decode_bench.parse_kernel_options(["words=eager", "fused_fma=1"]) == {
        "words": "eager",
        "fused_fma": True,
    }
    with pytest.raises(ValueError, match="'speed=fast'"):
        decode_bench.parse_kernel_options(["speed=fast"])
    with pytest.raises(ValueError, match="fused_fma must be 0 or 1, got 'yes'"):
        decode_bench.parse_kernel_options(["fused_fma=yes"])
    with pytest.raises(ValueError, match="words must be one of"):
        decode_bench.parse_kernel_options(["words=early"])


def test_kernel_options_reach_the_default_config(monkeypatch):
    from benchmarks import decode_bench
    from pallas_kernels.higgs_matmul import wrapper

    monkeypatch.setattr(wrapper, "default_config", wrapper.default_config)  # restored after
    decode_bench.apply_kernel_options({"words": "prefetch", "fused_fma": True})
    cfg = wrapper.default_config(1, 4096, 4096, 2, 4)
    assert cfg.words == "prefetch" and cfg.fused_fma
    dot = wrapper.default_config(64, 4096, 4096, 2, 4)  # the M > 8 path keeps its defaults
    assert dot.path == "dot" and dot.words == "lazy" and not dot.fused_fma


def test_rotation_option_reaches_every_path(monkeypatch):
    """rotation/reduce apply to the fma, dot and nk16 configs alike; words only to fma."""
    from benchmarks import decode_bench
    from pallas_kernels.higgs_matmul import wrapper

    monkeypatch.setattr(wrapper, "default_config", wrapper.default_config)
    monkeypatch.setattr(wrapper, "nk_config", wrapper.nk_config)
    assert wrapper.default_config(1, 4096, 4096, 1, 4).rotation == "kernel"  # library default
    decode_bench.apply_kernel_options({"rotation": "xla", "words": "eager"})
    fma = wrapper.default_config(1, 4096, 4096, 1, 4)
    dot = wrapper.default_config(64, 4096, 4096, 1, 4)
    nk = wrapper.nk_config(16, 4096, 4096, code_bits=4)
    assert fma.rotation == dot.rotation == nk.rotation == "xla"
    assert fma.words == "eager" and dot.words != "eager"


def test_variant_with_its_own_kernel_options():
    from benchmarks import decode_bench

    assert decode_bench.split_variant("p1_4b") == ("p1_4b", {})
    assert decode_bench.split_variant("p1_4b@rotation=xla,fused_fma=1") == (
        "p1_4b",
        {"rotation": "xla", "fused_fma": True},
    )
    assert decode_bench.variant_spec("p1_4b@rotation=xla").bits == 4
    with pytest.raises(ValueError, match="'p9_4b'"):
        decode_bench.split_variant("p9_4b@rotation=xla")
    with pytest.raises(ValueError, match="rotation must be one of"):
        decode_bench.split_variant("p1_4b@rotation=fast")
    with pytest.raises(ValueError, match="bf16 baseline takes no kernel options"):
        decode_bench.split_variant("bf16@rotation=xla")
    with pytest.raises(ValueError, match="nothing after '@'"):
        decode_bench.split_variant("p1_4b@")
    args = decode_bench.parse_args(["--variants", "bf16", "p1_4b", "p1_4b@rotation=xla"])
    assert args.variants[-1] == "p1_4b@rotation=xla"


def test_quantize_lm_head_makes_the_head_a_higgs_tensor():
    """--quantize-lm-head: the lm_head kernel becomes a HIGGS tensor of the variant's spec (the
    embeddings stay bf16), the params shrink, and one decode step through the quantized head
    agrees between the Pallas kernel (interpret) and XLA."""
    from higgs_jax.qtensor import HiggsTensor

    config = db.model_config(1, True)
    spec = db.variant_spec("p1_4b")
    key = jax.random.key(0)
    plain = db.build_params(config, spec, key, kernel_layout=False)
    quant = db.build_params(config, spec, key, kernel_layout=False, quantize_lm_head=True)
    assert not isinstance(plain["lm_head"]["kernel"], HiggsTensor)
    head = quant["lm_head"]["kernel"]
    assert isinstance(head, HiggsTensor) and head.shape == plain["lm_head"]["kernel"].shape
    assert not isinstance(quant["embed_tokens"]["embedding"], HiggsTensor)
    assert db.params_bytes(quant)["total"] < db.params_bytes(plain)["total"]
    args = db.parse_args(
        ["--tiny", "--layers", "1", "--batches", "1", "--variants", "p1_4b", "--quantize-lm-head"]
    )
    rows = list(db.run_check(args))
    assert len(rows) == 1 and rows[0]["ok"], rows


def test_nk16_params_converts_what_the_nk_path_takes():
    """--nk16: kernel weights the nk path takes go to the nk16 layout (same codes); the rest and
    non-weight leaves stay as they are."""
    import numpy as np
    from test_pallas_higgs_matmul import make_weight, signmag_weight

    from pallas_kernels.higgs_matmul.repack import kernel_codes, repack

    ok = repack(signmag_weight(make_weight(1024, 16, 1, 16, g=512)))
    p2 = repack(make_weight(1024, 16, 2, 16))
    params = {"a": ok, "b": p2, "c": jax.numpy.ones(3)}
    out, n_nk, n_kept = db.nk16_params(params)
    assert (n_nk, n_kept) == (1, 1)
    assert out["a"].layout == "nk16" and out["b"] is p2 and out["c"] is params["c"]
    np.testing.assert_array_equal(np.asarray(kernel_codes(out["a"])), np.asarray(kernel_codes(ok)))


def test_norm_option_reaches_every_path(monkeypatch):
    from benchmarks import decode_bench
    from pallas_kernels.higgs_matmul import wrapper

    monkeypatch.setattr(wrapper, "default_config", wrapper.default_config)
    monkeypatch.setattr(wrapper, "nk_config", wrapper.nk_config)
    assert wrapper.default_config(1, 4096, 4096, 1, 4).norm == "xla"  # library default
    assert decode_bench.split_variant("p1_4b@norm=kernel")[1] == {"norm": "kernel"}
    decode_bench.apply_kernel_options({"norm": "kernel"})
    assert wrapper.default_config(1, 4096, 4096, 1, 4).norm == "kernel"
    assert wrapper.nk_config(16, 4096, 4096, code_bits=4).norm == "kernel"
    with pytest.raises(ValueError, match="norm must be one of"):
        decode_bench.parse_kernel_options(["norm=fused"])


def test_check_job_runs_with_variant_options(capsys):
    """The check job (a child run with --one check) accepts variants that carry options."""
    argv = ["--tiny", "--layers", "1", "--batches", "1", "--variants", "p1_4b@rotation=xla"]
    db.main(argv + ["--one", "check"])
    out = capsys.readouterr().out
    assert db.RESULT_PREFIX in out and '"kind": "check"' in out
