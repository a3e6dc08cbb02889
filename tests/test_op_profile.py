"""The op profiler's pieces that need no GPU: case parsing (with clear errors) and the idle-time
attribution of a kernel timeline."""

from __future__ import annotations

import pytest

from benchmarks.op_profile import Case, idle_before_by_name, main


def test_case_parse():
    c = Case.parse("8192x28672:16:p1_4b:nk:row_steps=2,rotation=xla")
    assert (c.k, c.n, c.m, c.grid, c.path) == (8192, 28672, 16, "p1_4b", "nk")
    assert c.label == "8192x28672 M=16 p1_4b nk [row_steps=2,rotation=xla]"


@pytest.mark.parametrize(
    "text,match",
    [
        ("8192x28672:16:p1_4b", "KxN:M:grid:path"),
        ("8192x28672:x:p1_4b:nk", "M must be an integer, got 'x'"),
        ("8192x28672:1:p1_9b:nk", "unknown grid 'p1_9b'"),
        ("8192x28672:1:p1_4b:wide", "path must be 'default' or 'nk', got 'wide'"),
        ("8192x28672:1:p1_4b:nk:speed=11", "speed=11"),
    ],
)
def test_case_parse_bad(text, match):
    with pytest.raises(ValueError, match=match):
        Case.parse(text)


def test_idle_before_by_name():
    ev = [
        {"name": "a", "ts": 0.0, "dur": 10.0},
        {"name": "b", "ts": 12.0, "dur": 5.0},  # 2 idle before b
        {"name": "c", "ts": 15.0, "dur": 1.0},  # overlaps b: no idle
        {"name": "a", "ts": 17.0, "dur": 3.0},  # back to back
        {"name": "b", "ts": 26.0, "dur": 1.0},  # 6 idle before b
    ]
    assert idle_before_by_name(ev, calls=2) == {"b": 4.0}


def test_main_without_gpu(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--smoke"]) == 0
    assert "no GPU" in capsys.readouterr().out


def test_timing_loop_bad_calls_per_iteration():
    from pallas_kernels.higgs_matmul.autotune import time_device, timing_loop

    with pytest.raises(ValueError, match="calls_per_iteration must be >= 1, got 0"):
        timing_loop(lambda a, w: a * w, [2.0], 4, calls_per_iteration=0)
    with pytest.raises(ValueError, match="calls_per_iteration must be >= 1, got -3"):
        time_device(lambda a, w: a * w, None, [2.0], 4, calls_per_iteration=-3)


def test_timing_loop_counts_calls():
    import jax.numpy as jnp

    from pallas_kernels.higgs_matmul.autotune import timing_loop

    loop, calls = timing_loop(lambda a, w: a * w, [jnp.float32(1), jnp.float32(1)], 5,
                              calls_per_iteration=4)
    assert calls == 8  # 2 copies x 2 passes per iteration x 2 iterations >= 5
    assert float(loop(jnp.ones(3), [jnp.float32(1), jnp.float32(1)])[0]) == 1.0


def test_timing_check_rejects_bad_cpi(tmp_path):
    from benchmarks.timing_check import main as tc_main

    with pytest.raises(SystemExit):
        tc_main(["--out", str(tmp_path), "--cpi", "32", "0"])
