"""benchmarks/sass_count.py: the CPU half (Triton IR capture) and the SASS loop counter."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import sass_count  # noqa: E402
from benchmarks.kernel_bench import random_weight  # noqa: E402
from pallas_kernels.higgs_matmul.config import Config  # noqa: E402


def test_capture_ttir_on_a_cpu_only_jaxlib():
    w = random_weight(jax.random.key(0), 512, 128, 1, 16)
    cfg = Config(block_n=64, block_k=256, split_k=2, path="fma", decode="regtab")
    text = sass_count.capture_ttir(jnp.zeros((1, 512), jnp.bfloat16), w, cfg)
    assert "tt.func" in text and "higgs_matmul_p1_cb4_fma_regtab" in text
    assert "prmt.b32" in text  # the register-table decoder's inline PTX is in the IR


def test_loop_counts_takes_the_longest_backward_loop():
    sass = "\n".join(
        [
            "Function:k",
            "--:-:-:-:1\tMOV R1, R2;",
            ".L_x_0:",
            "--:-:-:-:1\tPRMT R3, R4, 0x4000, R5;",
            "--:-:-:-:1\t@P0 FFMA R6, R3, R7, R6;",
            "--:-:-:-:1\tPRMT R3, R4, 0x5111, R5;",
            "--:-:-:-:1\t@!P0 BRA .L_x_0;",
            "LBB1:",
            "--:-:-:-:1\tIADD3 R1, R1, 1, RZ;",
            "--:-:-:-:1\tBRA LBB1;",
            "--:-:-:-:1\tEXIT;",
        ]
    )
    cnt = sass_count.loop_counts(sass)
    assert cnt == {"PRMT": 2, "FFMA": 1, "BRA": 1}


def test_bad_shape_is_named(capsys, tmp_path):
    import pytest

    with pytest.raises(SystemExit):
        sass_count.main(["--shape", "8192by28672", "--out", str(tmp_path)])
    assert "8192by28672" in capsys.readouterr().err


def test_bad_config_override_is_named(capsys, tmp_path):
    import pytest

    with pytest.raises(SystemExit):
        sass_count.main(["--loop-stages", "11", "--out", str(tmp_path)])
    assert "loop_stages must be an int in [0, 8], got 11" in capsys.readouterr().err
