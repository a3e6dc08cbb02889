"""Data-aware HIGGS on smollm2-135m (issue 6): NF4, RTN, data-free HIGGS (p = 1, 2), HIGGS+GPTQ,
QuantEase and QuantEase + outliers at ~4, ~3.25, ~3 and ~2.5 bits/weight (everything stored
counted: codes, scales, padding, outlier indices and values).

Protocol (same as benchmarks/smollm2_quality.py): WikiText-2 test, seqlen 2048, non-overlapping
windows, every quantized model evaluated through `dequantize_params` (the same model
mathematically; one compiled forward serves every configuration). Calibration: random windows of
the WikiText-2 *validation* text (never the test split), quantized sequentially (each linear
layer sees the outputs of the already-quantized layers before it). Quantization time is wall time
of the whole call (calibration forward passes, Sigma, the method; first-call compilation
included, so the first contender of each shape pays it).

GPU (the lead's run):
  python benchmarks/smollm2_datawise.py --model SMOLLM2.gguf --text-dir DATA/text --out OUT

CPU smoke run on the embedded tiny model:
  python benchmarks/smollm2_datawise.py --model higgs_jax/data/stories260k \
      --eval-text higgs_jax/data/stories260k/tinystories_valid_head.txt \
      --calib-text higgs_jax/data/stories260k/tinystories_valid_head.txt \
      --seqlen 256 --windows 2 --calib-samples 4 --calib-seqlen 128 --sweeps 2 \
      --hadamard-size 64 --out /tmp/dw

Quantization time only (no perplexity; rows carry "ppl": null, "dppl": null, "eval_s": null):
  add --no-eval (then only the calibration text is read).

Prints one line per contender while running, then the table (last), and writes
OUT/datawise.json, merged with the rows of earlier runs into the same OUT (so a time-limited
machine can run one --budgets value per call); --fresh starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig
from higgs_jax.datawise.pipeline import DatawiseLayerReport, quantize_params_datawise
from higgs_jax.datawise.specs import GPTQConfig, QuantEaseConfig, is_datawise
from higgs_jax.params import dequantize_params, quantize_params

FAMILIES = ("nf4", "rtn", "higgs", "gptq", "quantease", "quantease_outliers")
EXCLUDE = (r"(^|/)(embed|embed_tokens|embedding|wte|wpe|lm_head)(/|$)", None)
KERNELS = r"(^|/)kernel$"


def log(*a):
    print(*a, flush=True)


@dataclasses.dataclass(frozen=True)
class Contender:
    budget: str
    family: str
    name: str
    spec: object  # None when it could not be built (see `why`)
    why: str = ""


def contenders(h: int, sweeps: int, p_dw: int, outlier_iters: int = 10) -> list[Contender]:
    """Specs per budget. HIGGS scales: one bf16 per Hadamard block (g = h, ~16/h bits) unless a
    smaller group is needed to reach the budget; outliers cost 96 bits each (int32 row, int32
    col, float32 value), i.e. 0.96 bits/weight at 1%."""

    def hg(bits, p, g=None):
        return HiggsConfig(bits=bits, p=p, hadamard_size=h, group_size=g)

    def qe(base, frac=None):
        if frac is None:
            return QuantEaseConfig(base, num_sweeps=sweeps)
        return QuantEaseConfig(
            base, num_sweeps=sweeps, outlier_fraction=frac, outlier_iters=outlier_iters
        )

    rows = []

    def add(budget, family, name, make):
        try:
            rows.append(Contender(budget, family, name, make()))
        except ValueError as e:  # e.g. a grid that is not shipped
            rows.append(Contender(budget, family, name, None, str(e)))

    # ~4 bits
    add("4", "nf4", "NF4 b64", lambda: NF4Config(block_size=64))
    add("4", "rtn", "RTN 4b g128", lambda: RTNConfig(bits=4, group_size=128))
    add("4", "higgs", "HIGGS p1 4b", lambda: hg(4, 1))
    add("4", "higgs", "HIGGS p2 4b", lambda: hg(4, 2))
    add("4", "gptq", f"GPTQ p{p_dw} 4b", lambda: GPTQConfig(hg(4, p_dw)))
    add("4", "quantease", f"QuantEase p{p_dw} 4b", lambda: qe(hg(4, p_dw)))
    add("4", "quantease_outliers", f"QuantEase p{p_dw} 3b +1%", lambda: qe(hg(3, p_dw), 0.01))
    # ~3.25 bits: 3-bit grids with a scale per 64 weights (as RTN g64)
    add("3.25", "rtn", "RTN 3b g64", lambda: RTNConfig(bits=3, group_size=64))
    add("3.25", "higgs", "HIGGS p1 3b g64", lambda: hg(3, 1, 64))
    add("3.25", "higgs", "HIGGS p2 3b g64", lambda: hg(3, 2, 64))
    add("3.25", "gptq", f"GPTQ p{p_dw} 3b g64", lambda: GPTQConfig(hg(3, p_dw, 64)))
    add("3.25", "quantease", f"QuantEase p{p_dw} 3b g64", lambda: qe(hg(3, p_dw, 64)))
    add(
        "3.25",
        "quantease_outliers",
        f"QuantEase p{p_dw} 2b g64 +1%",
        lambda: qe(hg(2, p_dw, 64), 0.01),
    )
    # ~3 bits
    add("3", "rtn", "RTN 3b g128", lambda: RTNConfig(bits=3, group_size=128))
    add("3", "higgs", "HIGGS p1 3b", lambda: hg(3, 1))
    add("3", "higgs", "HIGGS p2 3b", lambda: hg(3, 2))
    add("3", "gptq", f"GPTQ p{p_dw} 3b", lambda: GPTQConfig(hg(3, p_dw)))
    add("3", "quantease", f"QuantEase p{p_dw} 3b", lambda: qe(hg(3, p_dw)))
    add("3", "quantease_outliers", f"QuantEase p{p_dw} 2b +1%", lambda: qe(hg(2, p_dw), 0.01))
    # ~2.5 bits: 2-bit grids with a scale per 32 weights (as RTN g32)
    add("2.5", "rtn", "RTN 2b g32", lambda: RTNConfig(bits=2, group_size=32))
    add("2.5", "higgs", "HIGGS p1 2b g32", lambda: hg(2, 1, 32))
    add("2.5", "higgs", "HIGGS p2 2b g32", lambda: hg(2, 2, 32))
    add("2.5", "gptq", f"GPTQ p{p_dw} 2b g32", lambda: GPTQConfig(hg(2, p_dw, 32)))
    add("2.5", "quantease", f"QuantEase p{p_dw} 2b g32", lambda: qe(hg(2, p_dw, 32)))
    add("2.5", "quantease_outliers", f"QuantEase p{p_dw} 2b +0.5%", lambda: qe(hg(2, p_dw), 0.005))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        "--gguf",
        dest="model",
        required=True,
        help="GGUF file or HF directory (smollm2-135m)",
    )
    ap.add_argument(
        "--text-dir",
        default=None,
        help="dir with wikitext2_test.txt and wikitext2_valid_tokenized.txt",
    )
    ap.add_argument(
        "--eval-text", default=None, help="evaluation text (default TEXT_DIR/wikitext2_test.txt)"
    )
    ap.add_argument(
        "--calib-text",
        default=None,
        help="calibration text (default TEXT_DIR/wikitext2_valid_tokenized.txt)",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--sequential", choices=["layer", "block", "none"], default="layer")
    ap.add_argument(
        "--no-share-inputs",
        action="store_true",
        help="solve q/k/v and gate/up one kernel at a time (default: one solve per shared input; "
        "same result up to float rounding)",
    )
    ap.add_argument("--sweeps", type=int, default=20, help="QuantEase sweeps")
    ap.add_argument(
        "--outlier-iters",
        type=int,
        default=10,
        help="QuantEase+outliers: rounds of (IHT, one sweep) after the --sweeps plain sweeps",
    )
    ap.add_argument("--datawise-p", type=int, default=2, help="grid dimension of GPTQ/QuantEase")
    ap.add_argument(
        "--hadamard-size",
        type=int,
        default=1536,
        help="HIGGS h (1536: per layer the largest order dividing K, as 'hfull' in "
        "smollm2_quality.py)",
    )
    ap.add_argument("--budgets", default="4,3.25,3,2.5")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--precision", default="highest")
    ap.add_argument(
        "--progress",
        action="store_true",
        help="progress bars over calibration and layers (long CPU runs print nothing otherwise)",
    )
    ap.add_argument(
        "--no-eval",
        action="store_true",
        help="skip the fp evaluation and every contender's perplexity (quantization time, bits "
        "and Hessian errors only; rows carry null ppl/dppl/eval_s)",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="ignore rows of an earlier run in OUT/datawise.json (default: merge)",
    )
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", args.precision)

    from higgs_jax.checkpoints import load_checkpoint
    from higgs_jax.evaluate import perplexity, tokenize_text
    from higgs_jax.tokenizer import load_tokenizer

    evaluate = not args.no_eval
    if args.calib_text is None and args.text_dir is None:
        ap.error("--text-dir is needed unless --calib-text is given")
    if evaluate and args.eval_text is None and args.text_dir is None:
        ap.error("--text-dir is needed unless --eval-text is given (or --no-eval)")
    eval_path = (
        Path(args.eval_text or Path(args.text_dir) / "wikitext2_test.txt") if evaluate else None
    )
    calib_path = Path(args.calib_text or Path(args.text_dir) / "wikitext2_valid_tokenized.txt")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = args.budgets.split(",")
    families = args.families.split(",")
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; choose from {FAMILIES}")

    t0 = time.perf_counter()
    params, config = load_checkpoint(args.model)
    mpath = Path(args.model)
    tok = load_tokenizer(mpath.parent if mpath.is_file() else mpath, config)
    test_tokens = tokenize_text(tok, eval_path.read_text()) if evaluate else []
    calib_tokens = tokenize_text(tok, calib_path.read_text())
    seqlen = min(args.seqlen, config.max_position_embeddings)
    calib_seqlen = min(args.calib_seqlen, config.max_position_embeddings)
    env = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "seqlen": seqlen,
        "windows": args.windows,
        "calib_samples": args.calib_samples,
        "calib_seqlen": calib_seqlen,
        "sequential": args.sequential,
        "share_inputs": not args.no_share_inputs,
        "sweeps": args.sweeps,
        "outlier_iters": args.outlier_iters,
        "evaluated": evaluate,
        "eval_text": str(eval_path) if evaluate else None,
        "calib_text": str(calib_path),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    log(
        f"loaded in {time.perf_counter() - t0:.1f}s on {env['device']}; test tokens "
        f"{len(test_tokens)}, calibration tokens {len(calib_tokens)}"
    )

    def ppl(p):
        return perplexity(
            p,
            config,
            test_tokens,
            seqlen=seqlen,
            num_windows=args.windows,
            batch_size=args.batch_size,
            progress=False,
        ).ppl

    if evaluate:
        t1 = time.perf_counter()
        fp_ppl = ppl(params)
        log(f"fp PPL {fp_ppl:.4f} ({time.perf_counter() - t1:.1f}s incl. compile)")
    else:
        fp_ppl = None
        log("--no-eval: no perplexities (fp or quantized)")
    rows = [
        {
            "budget": "fp",
            "family": "fp",
            "method": "fp32",
            "spec": "",
            "bits": 32.0,
            "ppl": fp_ppl,
            "dppl": 0.0 if evaluate else None,
            "quant_s": 0.0,
        }
    ]
    # Merge with an earlier run in the same --out (e.g. one call per budget on a time-limited
    # machine): rows of other (budget, method) pairs are kept, re-measured ones replaced.
    result_file = out / "datawise.json"
    kept = []
    if result_file.is_file() and not args.fresh:
        kept = [r for r in json.loads(result_file.read_text())["rows"] if r["budget"] != "fp"]

    def save(final=False):
        done = {(r["budget"], r["method"]) for r in rows}
        merged = rows[:1] + sorted(
            [r for r in kept if (r["budget"], r["method"]) not in done] + rows[1:],
            key=lambda r: (-float(r["budget"]), FAMILIES.index(r["family"])),
        )
        payload = {"env": env, "rows": merged}
        if final:
            payload["verdicts"] = _verdicts(
                merged, sorted({r["budget"] for r in merged[1:]}, key=lambda b: -float(b))
            )
        result_file.write_text(json.dumps(payload, indent=1))
        return payload

    for c in contenders(args.hadamard_size, args.sweeps, args.datawise_p, args.outlier_iters):
        if c.budget not in budgets or c.family not in families:
            continue
        if c.spec is None:
            log(f"  skip {c.name}: {c.why}")
            continue
        rules = (EXCLUDE, (KERNELS, c.spec))
        t1 = time.perf_counter()
        if is_datawise(c.spec):
            q, rep = quantize_params_datawise(
                params,
                config,
                calib_tokens,
                rules,
                num_samples=args.calib_samples,
                seqlen=calib_seqlen,
                key=jax.random.key(0),
                sequential=args.sequential,
                batch_size=args.calib_batch,
                calib_source=str(calib_path),
                share_inputs=not args.no_share_inputs,
                progress=args.progress,
            )
        else:
            q, rep = quantize_params(params, rules, key=jax.random.key(0))
        jax.block_until_ready(jax.tree_util.tree_leaves(q))
        tq = time.perf_counter() - t1
        if evaluate:
            t2 = time.perf_counter()
            p = ppl(dequantize_params(q))
            t_eval = time.perf_counter() - t2
        else:
            p = t_eval = None
        row = {
            "budget": c.budget,
            "family": c.family,
            "method": c.name,
            "spec": c.spec.describe(),
            "bits": rep.quantized_bits_per_weight,
            "ppl": p,
            "dppl": None if p is None else p - fp_ppl,
            "quant_s": tq,
            "eval_s": t_eval,
            "model_mb": rep.total_megabytes,
        }
        dw = [r for r in rep.layers if isinstance(r, DatawiseLayerReport)]
        if dw:
            row["calib_s"] = rep.calibration["calibration_seconds"]
            # Layer solve time (data-free start, Sigma checks, GPTQ / QuantEase, packing, errors).
            row["solve_s"] = float(sum(r.seconds for r in dw))
            row["mean_hessian_error"] = float(np.mean([r.hessian_error for r in dw]))
            row["mean_hessian_error_datafree"] = float(
                np.mean([r.hessian_error_datafree for r in dw])
            )
            # Sum over layers of tr(E Sigma E^T) / tr(W Sigma W^T) (each layer on its own Sigma,
            # which in sequential modes depends on the method's earlier layers).
            row["sum_hessian_error"] = float(np.sum([r.hessian_error for r in dw]))
            row["sum_hessian_error_datafree"] = float(
                np.sum([r.hessian_error_datafree for r in dw])
            )
            row["notes"] = sorted({r.notes for r in dw if r.notes})[:3]
        rows.append(row)
        extra = (
            f" (calib {row['calib_s']:.1f}s, solve {row['solve_s']:.1f}s) sum H-err "
            f"{row['sum_hessian_error_datafree']:.4f}->{row['sum_hessian_error']:.4f}"
            if dw
            else ""
        ) + ("" if t_eval is None else f" eval {t_eval:.1f}s")
        log(
            f"  [{c.budget:>4s}] {c.name:28s} bits {row['bits']:6.3f} PPL {_num(p, '9.4f')} "
            f"dPPL {_num(row['dppl'], '+8.4f')} quant {tq:7.1f}s{extra}"
        )
        save()

    payload = save(final=True)
    log(f"\ndone in {time.perf_counter() - t0:.1f}s; results in {result_file}")
    for v in payload["verdicts"]:
        log("  " + v["text"])
    log(
        "\n"
        + f"{'budget':>6s} {'method':30s} {'bits/w':>7s} {'PPL':>9s} {'dPPL':>9s} {'quant s':>8s}"
        + f" {'sum H-err':>10s}"
    )
    for r in payload["rows"]:
        he = f"{r['sum_hessian_error']:10.4f}" if "sum_hessian_error" in r else f"{'':10s}"
        log(
            f"{r['budget']:>6s} {r['method']:30s} {r['bits']:7.3f} {_num(r.get('ppl'), '9.4f')} "
            f"{_num(r.get('dppl'), '+9.4f')} {r['quant_s']:8.1f} {he}"
        )


def _num(x, fmt: str) -> str:
    """`x` formatted with `fmt`, or "-" right-aligned to the same width when it is None."""
    if x is None:
        width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
        return f"{'-':>{width}s}"
    return format(x, fmt)


def _verdicts(rows, budgets):
    """Per budget: is higgs-jax's best dPPL below every NF4/RTN row with >= its bits? QuantEase <= GPTQ?

    Rows without a perplexity (--no-eval) take no part; a budget with none is skipped."""
    out = []
    for b in budgets:
        rs = [r for r in rows if r["budget"] == b and r.get("dppl") is not None]
        ours = [
            r for r in rs if r["family"] in ("higgs", "gptq", "quantease", "quantease_outliers")
        ]
        base = [r for r in rs if r["family"] in ("nf4", "rtn")]
        if not ours or not base:
            continue
        best = min(ours, key=lambda r: r["dppl"])
        rivals = [r for r in base if r["bits"] >= best["bits"] - 1e-9]
        ok = all(best["dppl"] < r["dppl"] for r in rivals)
        g = [r for r in rs if r["family"] == "gptq"]
        q = [r for r in rs if r["family"] == "quantease"]
        qe_vs = None if not (g and q) else bool(q[0]["dppl"] <= g[0]["dppl"])
        he_vs = None
        if g and q and "sum_hessian_error" in g[0] and "sum_hessian_error" in q[0]:
            he_vs = bool(q[0]["sum_hessian_error"] <= g[0]["sum_hessian_error"])
        rival_s = ", ".join(f"{r['method']} {r['dppl']:+.4f}" for r in rivals) or "none"
        text = (
            f"~{b} bits: best {best['method']} ({best['bits']:.3f}b, dPPL {best['dppl']:+.4f}) "
            + ("beats" if ok else "does NOT beat")
            + f" NF4/RTN at >= its bits ({rival_s})"
            + ("" if qe_vs is None else f"; QuantEase <= GPTQ dPPL: {qe_vs}")
            + (
                ""
                if he_vs is None
                else f"; QuantEase <= GPTQ summed H-err: {he_vs} "
                f"({q[0]['sum_hessian_error']:.4f} vs {g[0]['sum_hessian_error']:.4f})"
            )
        )
        out.append(
            {
                "budget": b,
                "best": best["method"],
                "beats_baselines": ok,
                "quantease_le_gptq": qe_vs,
                "quantease_le_gptq_hessian_error": he_vs,
                "text": text,
            }
        )
    return out


if __name__ == "__main__":
    main()
