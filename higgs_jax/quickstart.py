"""The quickstart job: quantize a model with HIGGS and the baselines, evaluate, tabulate, plot.

With no arguments it uses the embedded default (stories260k, a tiny real Llama, and a slice of
TinyStories validation text, both shipped inside the package), so it runs on any machine with
no download. `--model/--text` run the same comparison on any supported checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jax
import numpy as np

from higgs_jax.config import HiggsConfig, NF4Config, QuantSpec, RTNConfig
from higgs_jax.params import default_rules, dequantize_params, quantize_params


def default_model_dir() -> Path:
    """Directory of the embedded stories260k checkpoint (config, safetensors, tokenizer)."""
    return Path(str(resources.files("higgs_jax") / "data" / "stories260k"))


def default_text_file() -> Path:
    return default_model_dir() / "tinystories_valid_head.txt"


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    spec: QuantSpec | None  # None = the full-precision model


def default_contenders(hadamard_size: int = 512) -> tuple[Contender, ...]:
    """HIGGS (p = 2) at 4, 3, 2 bits next to RTN and NF4 at comparable bits/weight."""
    return (
        Contender("fp32", None),
        Contender("HIGGS 4b p2", HiggsConfig(bits=4, p=2, hadamard_size=hadamard_size)),
        Contender("HIGGS 3b p2", HiggsConfig(bits=3, p=2, hadamard_size=hadamard_size)),
        Contender("HIGGS 2b p2", HiggsConfig(bits=2, p=2, hadamard_size=hadamard_size)),
        Contender("NF4 b64", NF4Config(block_size=64)),
        Contender("RTN 4b g64", RTNConfig(bits=4, group_size=64)),
        Contender("RTN 3b g64", RTNConfig(bits=3, group_size=64)),
        Contender("RTN 2b g64", RTNConfig(bits=2, group_size=64)),
    )


@dataclasses.dataclass
class Row:
    method: str
    spec: str
    bits_per_weight: float  # over the quantized layers, scales and padding included
    model_mb: float  # every parameter, at its stored size
    ppl: float
    delta_ppl: float
    quantize_seconds: float
    eval_seconds: float


def plot_pareto(rows: Sequence[Row], path: Path, title: str) -> Path:
    """PPL vs bits/weight, one marker family per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    families: dict[str, list[Row]] = {}
    fp = None
    for r in rows:
        if r.spec == "":
            fp = r
            continue
        families.setdefault(r.method.split()[0], []).append(r)
    markers = {"HIGGS": "o", "NF4": "s", "RTN": "^"}
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r.bits_per_weight)
        ax.plot([r.bits_per_weight for r in rs], [r.ppl for r in rs], marker=markers.get(fam, "x"),
                label=fam)
        for r in rs:
            ax.annotate(r.method.split(" ", 1)[-1], (r.bits_per_weight, r.ppl), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if fp is not None:
        ax.axhline(fp.ppl, color="gray", linestyle="--", label=f"{fp.method} ({fp.ppl:.3f})")
    ax.set_xlabel("bits per weight (codes + scales + padding)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(rows: Sequence[Row]) -> str:
    head = f"{'method':16s} {'bits/w':>7s} {'size MB':>8s} {'PPL':>9s} {'dPPL':>8s} {'quant s':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.method:16s} {r.bits_per_weight:7.3f} {r.model_mb:8.3f} {r.ppl:9.4f} "
            f"{r.delta_ppl:+8.4f} {r.quantize_seconds:8.2f}"
        )
    return "\n".join(lines)


def run(
    model: str | Path | None = None,
    text: str | Path | None = None,
    out_dir: str | Path = "higgs_quickstart",
    *,
    seqlen: int | None = None,
    num_windows: int | None = 40,
    batch_size: int = 8,
    bos: bool | None = None,
    contenders: Sequence[Contender] | None = None,
    sample_prompt: str = "Once upon a time",
    sample_tokens: int = 40,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> list[Row]:
    """Runs the comparison and writes results.{json,csv}, pareto.png and samples.txt to out_dir."""
    from higgs_jax.checkpoints import load_checkpoint
    from higgs_jax.evaluate import perplexity, tokenize_text
    from higgs_jax.models.llama import generate
    from higgs_jax.tokenizer import load_tokenizer

    embedded = model is None
    model_path = default_model_dir() if embedded else Path(model)
    text_path = default_text_file() if text is None else Path(text)
    if not text_path.is_file():
        raise ValueError(f"text file {text_path} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    params, config = load_checkpoint(model_path)
    tokenizer = load_tokenizer(model_path, config)
    if bos is None:
        bos = embedded  # stories260k is evaluated with BOS once at the start (data README)
    bos_id = getattr(config, "bos_token_id", None) or 1
    tokens = tokenize_text(tokenizer, text_path.read_text(), bos_id=bos_id if bos else None)
    if seqlen is None:
        seqlen = min(2048, config.max_position_embeddings)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    log(f"model {model_path} ({n_params:,} params), text {text_path} ({len(tokens):,} tokens), "
        f"seqlen {seqlen}, windows {num_windows or 'all'}")

    rows: list[Row] = []
    fp_ppl = None
    samples = {}
    prompt_ids = tokenize_text(tokenizer, sample_prompt, bos_id=bos_id if bos else None)
    key = jax.random.key(seed)
    for c in contenders or default_contenders():
        t0 = time.perf_counter()
        if c.spec is None:
            qparams, bpw, model_bits = params, 32.0, 32.0 * n_params
        else:
            qparams, report = quantize_params(params, default_rules(c.spec), key=key)
            bpw, model_bits = report.quantized_bits_per_weight, report.total_bits
        tq = time.perf_counter() - t0
        t0 = time.perf_counter()
        # Perplexity through the dequantized weights: the same function as the quantized forward
        # (tests check the logits agree), but one compiled forward serves every method, which
        # keeps the CPU quickstart fast. Generation below runs the quantized params themselves.
        res = perplexity(dequantize_params(qparams), config, tokens, seqlen=seqlen,
                         num_windows=num_windows, batch_size=batch_size, progress=progress)
        te = time.perf_counter() - t0
        if fp_ppl is None:
            fp_ppl = res.ppl
        row = Row(c.name, c.spec.describe() if c.spec else "", bpw, model_bits / 8 / 1e6, res.ppl,
                  res.ppl - fp_ppl, tq, te)
        rows.append(row)
        log(f"  {row.method:16s} bits/w {row.bits_per_weight:6.3f}  PPL {row.ppl:9.4f}  "
            f"(quantize {tq:5.1f}s, eval {te:5.1f}s)")
        if c.spec is None or c.name.startswith("HIGGS 4b"):
            ids = generate(qparams, config, prompt_ids, sample_tokens)
            samples[c.name] = tokenizer.decode(np.asarray(ids).tolist())

    (out / "results.json").write_text(json.dumps(
        {"model": str(model_path), "text": str(text_path), "seqlen": seqlen,
         "num_windows": num_windows, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dataclasses.asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    plot_pareto(rows, out / "pareto.png", f"{model_path.name}: PPL vs bits/weight")
    (out / "samples.txt").write_text(
        "\n\n".join(f"[{k}]\n{v}" for k, v in samples.items()) + "\n")
    log("")
    log(format_table(rows))
    log("")
    for k, v in samples.items():
        log(f"[{k}] {v!r}")
    log(f"\nwrote {out}/results.json, results.csv, pareto.png, samples.txt")
    return rows
