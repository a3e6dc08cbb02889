"""CPU tests of benchmarks/gpu_tests.py (the sharded GPU test runner): dealing, log parsing,
the report, and one real run over a few tests (on a CPU machine the gpu tests skip)."""

from __future__ import annotations

import pytest

from benchmarks import gpu_tests as gt


def test_deal_round_robin_keeps_every_test_once():
    ids = [f"t.py::a[{i}]" for i in range(10)]
    groups = gt.deal(ids, 4)
    assert [len(g) for g in groups] == [3, 3, 2, 2]
    assert sorted(sum(groups, [])) == sorted(ids)
    assert gt.deal(ids[:2], 4) == [[ids[0]], [ids[1]]]  # no empty shards
    with pytest.raises(ValueError, match="--shards must be >= 1, got 0"):
        gt.deal(ids, 0)


def test_log_outcomes_and_report():
    log = "\n".join([
        "tests/a.py::t[1] PASSED                [ 33%]",
        "tests/a.py::t[2] FAILED                [ 66%]",
        "tests/b.py::u SKIPPED (needs an NVIDIA GPU) [100%]",
        "FAILED tests/a.py::t[2] - AssertionError: rel err 0.5",
    ])
    res = gt.log_outcomes(log)
    assert res == {
        "tests/a.py::t[1]": ("passed", ""),
        "tests/a.py::t[2]": ("failed", "AssertionError: rel err 0.5"),
        "tests/b.py::u": ("skipped", ""),
    }
    ids = [*res, "tests/b.py::never"]
    text, bad = gt.report(ids, res)
    assert bad == 1
    assert "| tests/a.py | 1 | 1 | 0 | 0 | 0 |" in text
    assert "| tests/b.py | 0 | 0 | 0 | 1 | 1 |" in text  # the unreached test is "not run"
    assert "`tests/a.py::t[2]`: failed: AssertionError: rel err 0.5" in text


def test_runner_end_to_end_on_cpu(tmp_path):
    """Three gpu tests of the rotation kernel, two shards: on a CPU machine they are skipped,
    and every selected test gets an outcome."""
    rc = gt.main([
        "tests/test_rotate_kernel.py", "--out", str(tmp_path), "--shards", "2",
        "--timeout-s", "300", "-k", "gpu_kernel_rotation_split_k_padding or with_rms_norm and gpu",
    ])
    text = (tmp_path / "report.md").read_text()
    assert rc == 0 and "5 selected, 2 shards" in text
    assert "| tests/test_rotate_kernel.py | " in text and "not run" in text
    row = [r for r in text.splitlines() if r.startswith("| tests/test_rotate_kernel.py")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert sum(int(c) for c in cells[1:]) == 5 and cells[-1] == "0"  # all 5 reached
    with pytest.raises(ValueError, match="no tests selected"):
        gt.main(["tests/test_rotate_kernel.py", "--out", str(tmp_path), "-k", "no_such_test"])


def test_nonpositive_timeout_is_named(tmp_path):
    with pytest.raises(ValueError, match="--timeout-s must be positive, got 0.0"):
        gt.main(["tests/test_rotate_kernel.py", "--out", str(tmp_path), "--timeout-s", "0"])


def test_collect_reports_modules_that_do_not_import(tmp_path):
    """A module that fails to import (the GPU machine lacks some test-only packages) is named in
    the result instead of aborting the collection of the others."""
    (tmp_path / "test_ok_mod.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_a():\n    pass\n\ndef test_cpu():\n    pass\n"
    )
    (tmp_path / "test_bad_mod.py").write_text("import no_such_package_xyz\n")
    ids, errors = gt.collect([str(tmp_path)], "gpu", None)
    assert [i.split("::")[-1] for i in ids] == ["test_a"]
    assert len(errors) == 1 and next(iter(errors)).endswith("test_bad_mod.py")
    assert gt.collection_errors("ERROR tests/x.py - ModuleNotFoundError: gguf\n") == {
        "tests/x.py": "ModuleNotFoundError: gguf"
    }
