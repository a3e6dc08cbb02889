"""smollm2-135m quality benchmarks: HIGGS vs RTN/NF4 (issue 3), alpha calibration, linearity
and dynamic vs uniform bit allocation (issue 5).

Quantized models are evaluated through `dequantize_params` (mathematically the same model; it
lets one compiled forward serve every configuration). Perplexity follows the data README's
protocol: WikiText-2 test, seqlen 2048, non-overlapping windows. alpha is calibrated on the
WikiText-2 *validation* text, never on the evaluation windows.

  python benchmarks/smollm2_quality.py --gguf PATH.gguf --text-dir DIR --out OUT \
      --tasks quality,alphas,linearity --windows 148

Prints a table per task and writes OUT/<task>.json (+ PNG plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig  # noqa: E402
from higgs_jax.params import default_rules, dequantize_params, quantize_params  # noqa: E402


def log(*a):
    print(*a, flush=True)


def quality_contenders():
    out = []
    for p, bits_list in ((1, (2, 3, 4)), (2, (2, 3, 4)), (3, (2, 3, 4)), (4, (2, 3))):
        for b in bits_list:
            if not _grid_ok(p, b):
                continue
            out.append((f"HIGGS p{p} {b}b hfull", HiggsConfig(bits=b, p=p, hadamard_size=1536)))
    for b in (2, 3, 4):
        out.append((f"HIGGS p2 {b}b h64", HiggsConfig(bits=b, p=2, hadamard_size=64)))
        out.append((f"HIGGS p1 {b}b h64", HiggsConfig(bits=b, p=1, hadamard_size=64)))
    out.append(("NF4 b64", NF4Config(block_size=64)))
    for b in (4, 3, 2):
        out.append((f"RTN {b}b g64", RTNConfig(bits=b, group_size=64)))
        out.append((f"RTN {b}b g128", RTNConfig(bits=b, group_size=128)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="model: .gguf file or HF directory")
    ap.add_argument("--text-dir", required=True, help="dir with the test and calibration texts")
    ap.add_argument("--test-text", default="wikitext2_test.txt")
    ap.add_argument("--calib-text", default="wikitext2_valid_tokenized.txt")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--bos-id", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None,
                    help="smoke test: only the first N contenders / options / layers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", default="quality,alphas,linearity")
    ap.add_argument("--windows", type=int, default=148)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--alphas", default=None, help="reuse a saved alpha table instead of calibrating")
    ap.add_argument("--precision", default="highest")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", args.precision)

    from higgs_jax.checkpoints import load_checkpoint
    from higgs_jax.evaluate import perplexity, tokenize_text
    from higgs_jax.tokenizer import load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    t0 = time.perf_counter()
    params, config = load_checkpoint(args.gguf)
    tok = load_tokenizer(args.gguf, config)
    text_dir = Path(args.text_dir)
    test_tokens = tokenize_text(tok, (text_dir / args.test_text).read_text(), bos_id=args.bos_id)
    calib_tokens = tokenize_text(tok, (text_dir / args.calib_text).read_text(), bos_id=args.bos_id)
    S = args.seqlen
    env = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "python": platform.python_version(), "windows": args.windows, "seqlen": args.seqlen,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    log(f"loaded in {time.perf_counter() - t0:.1f}s on {env['device']}; test tokens {len(test_tokens)}")

    def ppl_test(p, windows=args.windows):
        return perplexity(p, config, test_tokens, seqlen=S, num_windows=windows,
                          batch_size=args.batch_size, progress=False).ppl

    def ppl_calib(p):
        return perplexity(p, config, calib_tokens, seqlen=S, num_windows=args.calib_windows,
                          batch_size=args.calib_windows, progress=False).ppl

    t0 = time.perf_counter()
    fp_ppl = ppl_test(params)
    log(f"fp PPL {fp_ppl:.4f} ({args.windows} windows, {time.perf_counter() - t0:.1f}s incl. compile)")

    if "quality" in tasks:
        rows = [{"method": "fp32 (dequantized Q4_1)", "spec": "", "bits": 32.0, "ppl": fp_ppl,
                 "dppl": 0.0, "quant_s": 0.0, "model_mb": None}]
        for name, spec in quality_contenders()[: args.limit]:
            t1 = time.perf_counter()
            q, rep = quantize_params(params, default_rules(spec), key=jax.random.key(0))
            tq = time.perf_counter() - t1
            ppl = ppl_test(dequantize_params(q))
            rows.append({"method": name, "spec": spec.describe(), "bits": rep.quantized_bits_per_weight,
                         "ppl": ppl, "dppl": ppl - fp_ppl, "quant_s": tq,
                         "model_mb": rep.total_megabytes})
            log(f"  {name:22s} bits {rows[-1]['bits']:6.3f} PPL {ppl:9.4f} dPPL {ppl - fp_ppl:+8.4f} quant {tq:5.1f}s")
            (out / "quality.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        log("\n" + f"{'method':24s} {'bits/w':>7s} {'PPL':>9s} {'dPPL':>9s} {'quant s':>8s}")
        for r in sorted(rows, key=lambda r: (r["method"].split()[0], r["bits"])):
            log(f"{r['method']:24s} {r['bits']:7.3f} {r['ppl']:9.4f} {r['dppl']:+9.4f} {r['quant_s']:8.1f}")

    if "alphas" in tasks or "linearity" in tasks:
        from higgs_jax.allocation.calibrate import AlphaTable, calibrate_alphas

        if args.alphas:
            table = AlphaTable.load(args.alphas)
        else:
            t1 = time.perf_counter()
            rules = default_rules(HiggsConfig())
            if args.limit:  # smoke test: the first `limit` layers only
                from higgs_jax.params import Rule, plan_quantization
                names = [p for p, lp in plan_quantization(params, rules).items() if lp.spec][: args.limit]
                rules = tuple(Rule("^" + re.escape(n) + "$", HiggsConfig()) for n in names)
            table = calibrate_alphas(params, ppl_calib, rules=rules, progress=False)
            table.meta.update({"calib_text": "wikitext2_valid_tokenized.txt",
                               "calib_windows": args.calib_windows, **env})
            table.save(out / "alphas.json")
            log(f"alphas: {len(table.layers)} layers in {time.perf_counter() - t1:.1f}s, "
                f"base calib PPL {table.base_ppl:.4f}, clipped {table.meta['clipped_to_zero']}")
            a = np.asarray(table.alphas)
            log(f"  alpha min {a.min():.3f} median {np.median(a):.3f} max {a.max():.3f}")

    if "linearity" in tasks:
        from higgs_jax.allocation import dynamic
        from higgs_jax.allocation.linearity import check_linearity, format_points, plot_linearity

        options = [HiggsConfig(bits=b, p=p, hadamard_size=1536)
                   for p, bs in ((1, (2, 3, 4, 5, 6)), (2, (2, 2.5, 3, 3.5, 4, 5, 6)), (3, (2, 3, 4)), (4, (2, 2.5, 3)))
                   for b in bs if _grid_ok(p, b)][: args.limit]
        lrules = default_rules(HiggsConfig())
        if args.limit:
            from higgs_jax.params import Rule
            lrules = tuple(Rule("^" + re.escape(n) + "$", HiggsConfig()) for n in table.layers)
        table_free = dynamic.error_table(params, options, rules=lrules)
        t1 = time.perf_counter()
        table_meas = dynamic.error_table(params, options, rules=lrules, measure=True)
        log(f"measured error table {table_meas.errors.shape} in {time.perf_counter() - t1:.1f}s; "
            f"shortcut vs measured: {dynamic.shortcut_report(table_meas, table_free)}")
        alphas = table.as_dict()
        plans, meta = {}, {}
        for j, o in enumerate(options):
            c = dynamic.uniform_choice(table_meas, j)
            name = f"uniform {o.describe().split(' h=')[0]}"
            plans[name] = dynamic.plan_from_choices(params, table_meas, c, rules=lrules)
            meta[name] = {"kind": "uniform", "option": o.describe()}
        budgets = (2.5, 3.0, 3.25, 3.5, 4.0)
        for budget in budgets:
            try:
                sol = dynamic.solve_dynamic(table_meas, alphas, budget)
            except ValueError as e:
                log(f"  budget {budget}: {e}")
                continue
            name = f"DP {budget:g} bits"
            plans[name] = dynamic.plan_from_choices(params, table_meas, sol.choices, rules=lrules)
            meta[name] = {"kind": "dp", "budget": budget,
                          "choices": [table_meas.option_names[c] for c in sol.choices]}
        points = check_linearity(params, plans, alphas, lambda p: ppl_test(dequantize_params(p)),
                                 fp_ppl, log=log)
        log("\n" + format_points(points))
        plot_linearity(points, out / "linearity.png", f"{Path(args.gguf).name}: {args.windows} windows")
        comp = []
        for budget in budgets:
            dp = next((p for p in points if p.name == f"DP {budget:g} bits"), None)
            if dp is None:
                continue
            ok = [p for p in points if meta[p.name]["kind"] == "uniform" and p.avg_bits <= budget + 1e-9]
            best = min(ok, key=lambda p: p.ppl) if ok else None
            comp.append({"budget": budget, "dp_bits": dp.avg_bits, "dp_ppl": dp.ppl,
                         "uniform": best.name if best else None,
                         "uniform_bits": best.avg_bits if best else None,
                         "uniform_ppl": best.ppl if best else None})
            log(f"  budget {budget:4.2f}: DP {dp.avg_bits:.3f}b PPL {dp.ppl:.4f} | best uniform "
                + (f"{best.name} {best.avg_bits:.3f}b PPL {best.ppl:.4f}" if best else "none"))
        (out / "linearity.json").write_text(json.dumps({
            "env": env, "fp_ppl": fp_ppl,
            "points": [dataclasses.asdict(p) | {"rel_error": p.rel_error} | meta.get(p.name, {})
                       for p in points],
            "dynamic_vs_uniform": comp,
            "shortcut": dynamic.shortcut_report(table_meas, table_free),
            "options": table_meas.option_names,
            "errors_measured": table_meas.errors.tolist(), "bits": table_meas.bits.tolist(),
            "layers": table_meas.layers,
        }, indent=1))
    log(f"done in {time.perf_counter() - t0:.1f}s")


def _grid_ok(p, b):
    from higgs_jax import grids

    n = round(2 ** (p * b))
    return (p, n) in set(grids.available_grids())


if __name__ == "__main__":
    main()
