"""CPU smoke test of benchmarks/route_bench.py: XLA and Pallas (interpret) agree on real
HiggsTensors, including the p = 4 grids (12-bit codes go through the repack shuffle)."""

from __future__ import annotations

import json

import pytest

from benchmarks import route_bench


def test_smoke_agrees_for_every_grid(tmp_path):
    grids = ["p4_3b", "p4_2b", "p2_3b"]
    assert route_bench.main(["--out", str(tmp_path), "--smoke", "--grids", *grids]) == 0
    rows = json.loads((tmp_path / "route_bench.json").read_text())["rows"]
    assert [r["grid"] for r in rows] == grids
    for r in rows:
        assert "error" not in r, r
        assert r["rel_diff"] < 1e-2


def test_bad_shape_is_named(capsys):
    with pytest.raises(SystemExit):
        route_bench.main(["--out", "/tmp/rb_bad", "--shapes", "4096by4096"])
    assert "4096by4096" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--m", "0"), ("--m", "300"), ("--reps", "0")])
def test_bad_rows_or_reps_are_named(capsys, flag, value):
    with pytest.raises(SystemExit):
        route_bench.main(["--out", "/tmp/rb_bad", flag, value])
    assert f"got {value}" in capsys.readouterr().err
