"""CPU tests of benchmarks/decode_profile.py: trace parsing and the per-step accounting."""

from __future__ import annotations

import pytest

from benchmarks import decode_profile as dp


def _events():
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #14(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "python"}},
    ]
    k = [  # two steps: rotation dot, HIGGS kernel, fusion; gaps 2 and 3 us before kernels
        ("gemm_fusion_dot_9", 0.0, 2.0),
        ("higgs_matmul_p2_cb8_fma_gather_pair", 4.0, 10.0),
        ("loop_add_fusion", 14.0, 1.0),
        ("gemm_fusion_dot_9", 18.0, 2.0),
        ("higgs_matmul_p2_cb8_fma_gather_pair", 20.0, 10.0),
        ("loop_add_fusion", 30.0, 2.0),
    ]
    ev = [{"ph": "X", "pid": 1, "tid": 7, "ts": t, "dur": d, "name": n} for n, t, d in k]
    ev += [{"ph": "X", "pid": 1, "tid": 8, "ts": 0.0, "dur": 40.0, "name": "derived line"}]
    ev += [{"ph": "X", "pid": 2, "tid": 9, "ts": 0.0, "dur": 50.0, "name": "host work"}]
    return meta + ev


def test_device_kernels_keep_only_stream_lines():
    kernels, lines = dp.device_kernels(_events())
    assert [e["name"] for e in kernels][:2] == ["gemm_fusion_dot_9", "higgs_matmul_p2_cb8_fma_gather_pair"]
    assert len(kernels) == 6
    assert "Stream #14(Compute)" in lines["/device:GPU:0"]


def test_summarize_accounts_every_microsecond():
    kernels, _ = dp.device_kernels(_events())
    s = dp.summarize(kernels, steps=2)
    assert s["span_us_per_step"] == pytest.approx(16.0)  # 0 .. 32 us over 2 steps
    assert s["busy_us_per_step"] == pytest.approx(13.5)  # 27 us of kernels
    assert s["idle_us_per_step"] == pytest.approx(2.5)
    assert sum(s["idle_before_us_per_step"].values()) == pytest.approx(2.5)
    assert s["idle_before_us_per_step"]["higgs pallas"] == pytest.approx(1.0)  # 2 us gap, step 1
    cats = s["categories"]
    assert cats["higgs pallas"]["us_per_step"] == pytest.approx(10.0)
    assert cats["higgs pallas"]["count_per_step"] == pytest.approx(1.0)
    assert s["kernels_per_step"] == pytest.approx(3.0)


def test_empty_trace_and_bad_args(tmp_path):
    assert dp.summarize([], steps=1) == {"kernels": 0}
    with pytest.raises(FileNotFoundError, match="perfetto_trace"):
        dp.load_trace(tmp_path)
    with pytest.raises(ValueError, match="unknown variant 'p9_9b'"):
        dp.main(["--out", str(tmp_path), "--variants", "p9_9b", "--tiny"])


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--layers"])
def test_nonpositive_sizes_are_named(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        dp.main(["--out", str(tmp_path), "--tiny", flag, "0"])
    err = capsys.readouterr().err
    assert "must be >= 1, got" in err and "0" in err.split("got")[-1]


def test_variant_options_apply_then_restore(tmp_path, monkeypatch):
    """A variant's own kernel options (p1_4b@rotation=xla) are in force while it is profiled
    and the library's config functions are restored afterwards."""
    from benchmarks import decode_bench as db
    from pallas_kernels.higgs_matmul import wrapper

    before = wrapper.default_config, wrapper.nk_config
    seen = []

    def fake_profile(args, name):
        seen.append((name, wrapper.default_config(1, 4096, 4096, 1, 4).rotation))
        return {"variant": name}

    monkeypatch.setattr(dp, "profile_variant", fake_profile)
    monkeypatch.setattr(dp, "render", lambda rows, top: "ok")
    dp.main(["--out", str(tmp_path), "--tiny", "--variants", "p1_4b@rotation=xla", "p1_4b"])
    assert seen == [("p1_4b@rotation=xla", "xla"), ("p1_4b", "kernel")]
    assert (wrapper.default_config, wrapper.nk_config) == before
    with pytest.raises(ValueError, match="rotation must be one of"):
        dp.main(["--out", str(tmp_path), "--tiny", "--variants", "p1_4b@rotation=slow"])
    assert db.split_variant("p1_4b")[1] == {}
