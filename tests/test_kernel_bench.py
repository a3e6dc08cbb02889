"""The kernel benchmark's table cells: speed-up, bandwidth share and roofline (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import kernel_bench

S17 = Path(__file__).resolve().parents[1] / "benchmarks/results/s17/kernel_table"


def test_roofline_is_torch_time_over_bytes_at_copy_bandwidth():
    """A cell that moved 117.7 MB at 3.02 TB/s copy bandwidth: the roofline speed-up is the
    torch time over 117.7 MB / 3.02 TB/s, whatever the kernel's own time."""
    nbytes, bw, torch_us = 117.7e6, 3.02e12, 155.5
    at_copy_bw_us = nbytes / bw * 1e6
    for us in (40.0, 64.4, 200.0):
        frac = nbytes / (us * 1e-6) / bw
        assert kernel_bench.roofline_speedup(torch_us, us, frac) == pytest.approx(
            torch_us / at_copy_bw_us, rel=1e-12
        )


def test_cell_matches_the_session17_table():
    """The raw session-17 row (8192x28672, M = 1, p1 4-bit) formats to the figures of the
    table that `merge.py` computed from the same JSON: 2.41x, bw 61%, roofline 4.0x."""
    rows = json.loads((S17 / "s17_big_full.json").read_text())["rows"]
    row = next(r for r in rows if r.get("K") == 8192 and r.get("M") == 1 and "p1_b4_us" in r)
    cell = kernel_bench.format_cell(row, "p1_b4")
    assert cell == "64.4 (2.41x, bw 61%, roof 4.0x)"
    assert "| 8192x28672 | 1 | 155.5 |" in (S17 / "TABLE.md").read_text()
    assert "64.4 (2.41x, 4.0x)" in (S17 / "TABLE.md").read_text()


@pytest.mark.parametrize("frac", [float("nan"), 0.0])
def test_cell_without_bandwidth_says_so(frac):
    """No copy bandwidth measured: the cell keeps the time and the speed-up and says bw n/a
    instead of printing a roofline from a NaN or a division by zero."""
    row = {"torch_us": 50.0, "x_us": 25.0, "x_bw_frac": frac}
    assert kernel_bench.format_cell(row, "x") == "25.0 (2.00x, bw n/a)"


def test_cell_without_torch_has_no_ratio():
    """Without torch (torch_us NaN) there is no speed-up and no roofline ratio to print."""
    row = {"torch_us": float("nan"), "x_us": 25.0, "x_bw_frac": 0.5}
    assert kernel_bench.format_cell(row, "x") == "25.0 (no torch, bw 50%)"
