"""The higgs-jax command line: help, quantize -> eval -> generate, grids, clear errors."""

import json

import numpy as np
import pytest

from higgs_jax import cli
from higgs_jax.quickstart import default_model_dir, default_text_file


def test_help_mentions_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("quickstart", "quantize", "eval", "generate", "grids"):
        assert cmd in out


def test_quantize_eval_generate_on_embedded_model(tmp_path, capsys):
    out = tmp_path / "q4"
    rc = cli.main(["quantize", "--model", str(default_model_dir()), "--out", str(out),
                   "--bits", "4", "--p", "2", "--hadamard-size", "64"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    kinds = {r["path"]: r["method"] for r in report["layers"]}
    assert kinds["layers_0/attn/q_proj/kernel"] == "higgs"
    assert kinds["embed_tokens/embedding"] == "kept"
    capsys.readouterr()
    rc = cli.main(["eval", "--model", str(out), "--text", str(default_text_file()),
                   "--seqlen", "256", "--windows", "4", "--bos-id", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["num_windows"] == 4 and 1.0 < res["ppl"] < 20.0
    rc = cli.main(["generate", "--model", str(out), "--prompt", "Once upon a time",
                   "--max-new-tokens", "8"])
    assert rc == 0
    fused_text = capsys.readouterr().out
    assert fused_text.startswith("Once upon a time")
    # fused q/k/v + gate/up (the default) is the same function: same greedy continuation
    rc = cli.main(["generate", "--model", str(out), "--prompt", "Once upon a time",
                   "--max-new-tokens", "8", "--no-fuse"])
    assert rc == 0
    assert capsys.readouterr().out == fused_text


def test_quantize_flax_safetensors_params(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    src = tmp_path / "p.safetensors"
    save_file({"dense/kernel": rng.standard_normal((128, 32)).astype(np.float32),
               "dense/bias": np.zeros(32, np.float32)}, str(src))
    rc = cli.main(["quantize", "--model", str(src), "--out", str(tmp_path / "o"), "--method", "rtn",
                   "--bits", "4", "--group-size", "64"])
    assert rc == 0
    layers = json.loads((tmp_path / "o" / "report.json").read_text())["layers"]
    assert {r["path"]: r["method"] for r in layers} == {"dense/bias": "kept", "dense/kernel": "rtn"}


@pytest.mark.parametrize(
    "argv,match",
    [
        (["quantize", "--model", "/nonexistent", "--out", "x"], "does not exist"),
        (["quantize", "--model", "{model}", "--out", "{tmp}/x", "--bits", "7"], "grid"),
        (["quantize", "--model", "{model}", "--out", "{tmp}/x", "--method", "nf4", "--bits", "3"],
         "NF4"),
        (["quantize", "--model", "{model}", "--out", "{tmp}/x", "--hadamard-size", "172"], "172"),
        (["eval", "--model", "{model}", "--text", "/nonexistent.txt"], "does not exist"),
    ],
)
def test_errors_are_clear(argv, match, tmp_path, capsys):
    argv = [a.format(model=default_model_dir(), tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and __import__("re").search(match, err), err


def test_grids_command(capsys):
    assert cli.main(["grids", "--samples", "4096"]) == 0
    out = capsys.readouterr().out
    assert "MSE" in out and len(out.strip().splitlines()) > 10
