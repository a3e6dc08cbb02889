"""CPU smoke test of benchmarks/tile_sweep.py (interpret mode: correctness of every candidate)."""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import tile_sweep


def test_smoke_checks_every_candidate(tmp_path):
    assert tile_sweep.main(["--out", str(tmp_path), "--smoke"]) == 0
    rows = json.loads((tmp_path / "tile_sweep.json").read_text())["rows"]
    assert len(rows) == len(tile_sweep.candidates(1, 512, 256, 2, 256, False))
    assert rows[0]["default"] and not any(r["default"] for r in rows[1:])
    for r in rows:
        assert "error" not in r, r
        assert r["rel_err"] < 2e-2


def test_candidates_are_distinct_and_start_with_the_default():
    from pallas_kernels.higgs_matmul import default_config

    cands = tile_sweep.candidates(1, 4096, 4096, 2, 256, True)
    assert cands[0] == default_config(1, 4096, 4096, 2, 4)
    assert len(set(cands)) == len(cands) > 10


def test_bad_shape_is_named(capsys):
    with pytest.raises(SystemExit):
        tile_sweep.main(["--out", "/tmp/ts_bad", "--shapes", "4096by4096"])
    assert "4096by4096" in capsys.readouterr().err


@pytest.mark.parametrize("grid", ["p2_4b", "p4_3b"])
def test_knob_sweep_smoke_checks_every_mode(tmp_path, grid):
    assert tile_sweep.main(["--out", str(tmp_path), "--smoke", "--knobs", "--grids", grid]) == 0
    rows = json.loads((tmp_path / "tile_sweep.json").read_text())["rows"]
    cands = tile_sweep.knob_candidates(1, 512, 256, *tile_sweep.GRIDS[grid])
    assert len(rows) == len(cands) == 12  # 2 tilings x 3 word-load modes x 2 FMA forms
    assert {(r["words"], r["fused_fma"]) for r in rows} == {
        (w, f) for w in ("lazy", "eager", "prefetch") for f in (False, True)
    }
    for r in rows:
        assert "error" not in r, r
        assert r["rel_err"] < 2e-2


@pytest.mark.parametrize("flag,value", [("--m", "0"), ("--reps", "-1")])
def test_bad_rows_or_reps_are_named(capsys, flag, value):
    with pytest.raises(SystemExit):
        tile_sweep.main(["--out", "/tmp/ts_bad", flag, value])
    assert f"got {value}" in capsys.readouterr().err


def test_decoder_sweep_smoke(tmp_path):
    """--decoders: every candidate (regtab at 3 tilings x separate/fused FMAs) is correct."""
    argv = ["--out", str(tmp_path), "--smoke", "--grids", "p1_3b", "--decoders", "regtab"]
    assert tile_sweep.main(argv) == 0
    rows = json.loads((tmp_path / "tile_sweep.json").read_text())["rows"]
    assert len(rows) == len(tile_sweep.decoder_candidates(1, 512, 256, 1, 8, ["regtab"]))
    assert {r["decode"] for r in rows[1:]} == {"regtab"}
    assert {r["fused_fma"] for r in rows[1:]} == {False, True}
    for r in rows:
        assert "error" not in r, r
        assert r["rel_err"] < 2e-2


def test_decoder_candidates_on_the_dot_path_keep_16_units():
    cands = tile_sweep.decoder_candidates(16, 8192, 28672, 1, 16, ["regtab"])
    assert cands[0].path == "dot"
    assert all(c.block_k // 32 >= 16 for c in cands)
    assert not any(c.fused_fma for c in cands[1:])


def test_unknown_decoder_is_named(capsys, tmp_path):
    with pytest.raises(SystemExit):
        tile_sweep.main(["--out", str(tmp_path), "--decoders", "regtab", "magic"])
    assert "'magic'" in capsys.readouterr().err


def test_decoder_candidates_take_warps_and_fused_only():
    cands = tile_sweep.decoder_candidates(
        1, 8192, 28672, 1, 16, ["regtab"], warps=(4, 8), fused=(True,)
    )
    assert {c.num_warps for c in cands[1:]} == {4, 8}
    assert all(c.fused_fma for c in cands[1:])
    knobs = tile_sweep.knob_candidates(1, 8192, 28672, 1, 8, warps=(8,), fused=(True,))
    assert knobs[0].num_warps == 4 and {c.num_warps for c in knobs[1:]} == {8}


def test_bad_warps_are_named(capsys, tmp_path):
    with pytest.raises(SystemExit):
        tile_sweep.main(["--out", str(tmp_path), "--decoders", "regtab", "--warps", "3"])
    assert "[3]" in capsys.readouterr().err


def test_kernel_bench_unknown_grid_is_named(capsys):
    from benchmarks import kernel_bench

    with pytest.raises(SystemExit):
        kernel_bench.main(["--mode", "smoke", "--grids", "p1_4b,p9_1b"])
    assert "p9_1b" in capsys.readouterr().err


def test_kernel_bench_nk_path(tmp_path, capsys):
    """--paths nk: the weights go through to_nk16 (uint16 words counted at 2 bytes each) and the
    CPU smoke checks the nk configs at M = 16 ("xw") and 64 ("wx") against the reference."""
    from benchmarks import kernel_bench
    from pallas_kernels.higgs_matmul.config import nk_config

    kw = kernel_bench.random_weight(jax.random.key(0), 1024, 64, 1, 16)
    cfg = kernel_bench.path_config("nk", 16, 1024, 64, 1, 16)
    assert cfg == nk_config(16, 1024, 64, code_bits=4) and cfg.dot_order == "xw"
    nk = kernel_bench.layout_for(kw, cfg)
    assert nk.layout == "nk16" and kernel_bench.weight_bytes(nk) == nk.words.size * 2 + kw.scales.size * 2
    assert kernel_bench.weight_bytes(nk) == kernel_bench.weight_bytes(kw)  # same code bytes
    rc = kernel_bench.main(
        ["--mode", "smoke", "--paths", "default,nk", "--grids", "p1_4b", "--results-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.count(" nk   auto") == 2 and "FAIL" not in out, out


def test_variants_override_the_default_config(tmp_path):
    assert tile_sweep.parse_variant("default") == {}
    assert tile_sweep.parse_variant("path=dot,block_k=512,tile_scale=false") == {
        "path": "dot",
        "block_k": 512,
        "tile_scale": False,
    }
    cands = tile_sweep.variant_candidates(16, 8192, 28672, 1, 16, ["tile_scale=false", "default"])
    assert len(cands) == 2 and cands[0].tile_scale and not cands[1].tile_scale
    assert cands[1].block_k == cands[0].block_k  # everything else is the default's
    # (the 16-row default decodes 2-bit codes with "regpair", which needs tile_scale)
    tile_sweep.main(
        ["--out", str(tmp_path), "--smoke", "--grids", "p1_2b", "--m", "16", "--variants",
         "tile_scale=false,decode=auto"]
    )
    rows = json.loads((tmp_path / "tile_sweep.json").read_text())["rows"]
    assert [r["tile_scale"] for r in rows] == [True, False]
    assert all(r["rel_err"] < 2e-2 for r in rows)


def test_variant_as_m_starts_from_another_m_default(tmp_path):
    from pallas_kernels.higgs_matmul.config import default_config

    cands = tile_sweep.variant_candidates(2, 8192, 28672, 1, 16, ["as_m=16", "as_m=16,num_warps=8"])
    assert cands[0] == default_config(2, 8192, 28672, 1, 4.0) and cands[0].path == "fma"
    assert cands[1] == default_config(16, 8192, 28672, 1, 4.0) and cands[1].path == "dot"
    assert cands[2].path == "dot" and cands[2].num_warps == 8
    with pytest.raises(ValueError, match="as_m must be a positive int"):
        tile_sweep.variant_candidates(2, 8192, 28672, 1, 16, ["as_m=0"])
    tile_sweep.main(["--out", str(tmp_path), "--smoke", "--grids", "p1_4b", "--m", "4",
                     "--variants", "as_m=16"])
    rows = json.loads((tmp_path / "tile_sweep.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["fma", "dot"] and all(r["rel_err"] < 2e-2 for r in rows)


def test_bad_variant_is_named(capsys, tmp_path):
    with pytest.raises(SystemExit):
        tile_sweep.main(["--out", str(tmp_path), "--variants", "num_warps=8", "warp=8"])
    assert "'warp=8'" in capsys.readouterr().err


def test_bad_variant_value_is_named(capsys, tmp_path):
    with pytest.raises(SystemExit):
        tile_sweep.main(["--out", str(tmp_path), "--variants", "num_warps=3"])
    err = capsys.readouterr().err
    assert "'num_warps=3'" in err and "num_warps must be a positive power of two, got 3" in err


def test_ncu_nk_smoke_runs_the_nk_path_with_overrides(capsys):
    """benchmarks/ncu_nk.py (the launcher for Nsight Compute) runs the nk path in interpret mode
    with a config override and reports a finite result; a bad override names the field."""
    from benchmarks import ncu_nk

    ncu_nk.main(["--smoke", "--bits", "2", "--set", "split_k=1"])
    out = capsys.readouterr().out
    assert "nk 2-bit 1024x256 M=16" in out and "split_k=1" in out and "finite=True" in out
    with pytest.raises(ValueError, match="'splitk=1'"):
        ncu_nk.main(["--smoke", "--set", "splitk=1"])
