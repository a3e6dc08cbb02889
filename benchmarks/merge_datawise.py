"""Merge several `benchmarks/smollm2_datawise.py` result files into one JSON and one markdown file.

Each input is a `datawise.json` ({"env": {...}, "rows": [...]}). Inputs are given in order of
precedence: when two inputs hold the same (budget, method), the row of the *later* input is kept
and the earlier one's timings are kept on it as `quant_s_cold` (plus `calib_s_cold`,
`solve_s_cold`, `quant_s_cold_run`, `quant_s_cold_cache`) — the use case being a re-run on a warm
persistent JAX compilation cache, whose `quant_s` excludes most first-call compilation.

Sanity check (no test suite needed): if two inputs disagree on the PPL of the same (budget,
method) by more than `--rtol` (default 1e-3) relative, the script prints both rows and exits
with status 1 without writing anything. Agreements are printed with their relative difference.

Each input may carry a label and the state of the compilation cache of its call:
`PATH[=LABEL[,CACHE]]`, e.g. `/x/datawise.json=D,warm` (CACHE: cold, partly-warm or warm;
unknown if omitted).

Example (the 2026-11-23/24 smollm2 runs):
  python benchmarks/merge_datawise.py \
      benchmarks/results/smollm2/datawise_b4.json=b4,cold \
      benchmarks/results/smollm2/datawise_b3.json=b3,cold \
      /work/.device/2/d/datawise.json=B,cold /work/.device/3/d/datawise.json=C,partly-warm \
      /work/.device/4/d/datawise.json=D,warm \
      --out-json benchmarks/results/smollm2/datawise_all.json \
      --out-md benchmarks/results/smollm2/datawise_all.md [--note "paragraph" ...]

Rows keep their own fields plus "run" (the source path) and "run_label"; the JSON's "runs" list
holds each input's env with "source", "label" and "compile_cache" added.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

FAMILY_ORDER = ("fp", "nf4", "rtn", "higgs", "gptq", "quantease", "quantease_outliers")
OURS = ("higgs", "gptq", "quantease", "quantease_outliers")
BASELINES = ("nf4", "rtn")
CACHE_STATES = ("cold", "partly-warm", "warm", "unknown")
HEADER = (
    "| method | bits/weight | PPL | ΔPPL | quantize s (warm cache; cold where measured) "
    "| calib s / solve s | sum H-err (data-free → method) |"
)

Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file.

    Attributes:
        path: the JSON file as given on the command line.
        label: short name used in the "run" field of rows and in the markdown.
        cache: compilation-cache state of the call that wrote it.
    """

    path: str
    label: str
    cache: str


def parse_source(arg: str) -> Source:
    """Parses `PATH[=LABEL[,CACHE]]`.

    Raises:
        ValueError: on an unknown cache state.
    """
    path, _, rest = arg.partition("=")
    label, _, cache = rest.partition(",")
    cache = cache or "unknown"
    if cache not in CACHE_STATES:
        raise ValueError(f"cache state {cache!r} in {arg!r} is not one of {CACHE_STATES}")
    return Source(path=path, label=label or path, cache=cache)


def budget_key(budget: str) -> float:
    """Sort key: fp first, then numeric budgets descending."""
    return float("-inf") if budget == "fp" else -float(budget)


def row_key(row: Row) -> tuple[str, str]:
    return (str(row["budget"]), str(row["method"]))


def merge(
    loaded: list[tuple[Source, dict[str, Any]]], rtol: float
) -> tuple[list[Row], list[str], list[str]]:
    """Merges rows by (budget, method), later inputs taking precedence.

    Args:
        loaded: (source, parsed JSON) in precedence order (last wins).
        rtol: relative PPL tolerance between duplicate rows.

    Returns:
        (sorted rows, agreement lines, disagreement lines).
    """
    merged: dict[tuple[str, str], Row] = {}
    order: dict[tuple[str, str], int] = {}
    agree: list[str] = []
    disagree: list[str] = []
    for src, data in loaded:
        for i, raw in enumerate(data["rows"]):
            row = dict(raw)
            row["run"] = src.path
            row["run_label"] = src.label
            key = row_key(row)
            if key in merged:
                old = merged[key]
                rel = abs(row["ppl"] - old["ppl"]) / abs(old["ppl"])
                line = (
                    f"[{key[0]}] {key[1]}: {old['run_label']} PPL {old['ppl']!r} vs "
                    f"{src.label} PPL {row['ppl']!r} (rel diff {rel:.1e})"
                )
                (disagree if rel > rtol else agree).append(line)
                if old.get("quant_s", 0.0) > 0.0:
                    if "quant_s_cold" in old:  # keep the earliest measurement
                        cold = {k: v for k, v in old.items() if "_cold" in k}
                    else:
                        cold = {
                            "quant_s_cold": old["quant_s"],
                            "quant_s_cold_run": old["run"],
                            "quant_s_cold_cache": _cache_of(loaded, old["run"]),
                        }
                        cold.update(
                            {f"{k}_cold": old[k] for k in ("calib_s", "solve_s") if k in old}
                        )
                    row.update(cold)
            else:
                order[key] = len(order) * 1000 + i
            merged[key] = row
    rows = sorted(
        merged.values(),
        key=lambda r: (
            budget_key(str(r["budget"])),
            FAMILY_ORDER.index(r["family"]) if r["family"] in FAMILY_ORDER else 99,
            order[row_key(r)],
        ),
    )
    return rows, agree, disagree


def _cache_of(loaded: list[tuple[Source, dict[str, Any]]], path: str) -> str:
    return next(s.cache for s, _ in loaded if s.path == path)


def fmt_ppl(x: float, sign: bool = False, ref: float | None = None) -> str:
    """Formats like benchmarks/RESULTS.md: 3 decimals under 100, 2 under 1000, else 2.82e6.

    `ref` (the PPL) picks the precision of a ΔPPL so both columns share it.
    """
    r = abs(x if ref is None else ref)
    s = "+" if sign and x >= 0 else ("-" if x < 0 else "")
    a = abs(x)
    if r >= 1000:
        mant, exp = f"{a:.2e}".split("e")
        return f"{s}{mant}e{int(exp)}"
    return f"{s}{a:.3f}" if r < 100 else f"{s}{a:.2f}"


def quant_cell(row: Row, cache: str) -> str:
    """quantize s: the kept (warm where re-measured) time, the first measurement in brackets."""
    q = f"{row['quant_s']:.1f}"
    if "quant_s_cold" in row:
        return f"{q} ({row['quant_s_cold_cache']} {row['quant_s_cold']:.1f})"
    if cache in ("cold", "partly-warm"):
        return f"{q} ({cache})"
    return q


def split_cell(row: Row) -> str:
    if "calib_s" not in row:
        return ""
    s = f"{row['calib_s']:.1f} / {row['solve_s']:.1f}"
    if "calib_s_cold" in row:
        s += f" ({row['calib_s_cold']:.1f} / {row['solve_s_cold']:.1f})"
    return s


def herr_cell(row: Row) -> str:
    if "sum_hessian_error" not in row:
        return ""
    return f"{row['sum_hessian_error_datafree']:.3f} → {row['sum_hessian_error']:.3f}"


def method_label(row: Row) -> str:
    return row["method"] + (" (data-free)" if row["family"] == "higgs" else "")


def verdict(rows: list[Row]) -> str:
    """One line: best higgs-jax row vs the best NF4/RTN row at >= its bits; QuantEase vs GPTQ."""
    ours = [r for r in rows if r["family"] in OURS]
    parts = []
    if ours:
        best = min(ours, key=lambda r: r["dppl"])
        rivals = [r for r in rows if r["family"] in BASELINES and r["bits"] >= best["bits"] - 1e-9]
        head = (
            f"best higgs-jax method {best['method']} ({best['bits']:.3f} b/w) "
            f"ΔPPL {fmt_ppl(best['dppl'], True, best['ppl'])}"
        )
        if rivals:
            rb = min(rivals, key=lambda r: r["dppl"])
            ratio = rb["dppl"] / best["dppl"]
            ratio_s = f"{ratio:.2f}" if ratio < 10 else f"{ratio:,.0f}"
            word = "beats" if best["dppl"] < rb["dppl"] else "does NOT beat"
            parts.append(
                f"{head} {word} the best NF4/RTN at ≥ its bits/weight, {rb['method']} "
                f"({rb['bits']:.3f} b/w) ΔPPL {fmt_ppl(rb['dppl'], True, rb['ppl'])} "
                f"({ratio_s}x the ΔPPL)"
            )
        else:
            parts.append(f"{head}; no NF4/RTN row at ≥ its bits/weight in this table")
    g = [r for r in rows if r["family"] == "gptq"]
    q = [r for r in rows if r["family"] == "quantease"]
    if g and q:
        g0, q0 = g[0], q[0]
        yn = {True: "yes", False: "no"}
        s = (
            f"QuantEase ≤ GPTQ in ΔPPL: {yn[q0['dppl'] <= g0['dppl']]} "
            f"({fmt_ppl(q0['dppl'], True, q0['ppl'])} vs {fmt_ppl(g0['dppl'], True, g0['ppl'])})"
        )
        if "sum_hessian_error" in g0 and "sum_hessian_error" in q0:
            s += (
                f", in summed H-err: {yn[q0['sum_hessian_error'] <= g0['sum_hessian_error']]} "
                f"({q0['sum_hessian_error']:.3f} vs {g0['sum_hessian_error']:.3f})"
            )
        parts.append(s)
    return "**Verdict:** " + "; ".join(parts) + "."


def timing_note(rows: list[Row], labels: dict[str, str]) -> str:
    """Cold vs warm compile note, listing every row measured both ways."""
    both = [r for r in rows if "quant_s_cold" in r]
    lines = [
        (
            "**Timing.** `quantize s` is the wall time of the whole quantization call on the H100 "
            "(calibration forwards, Σ, the solve and any first-call XLA compilation). Calls on a "
            "fresh machine compile every kernel shape (cold); a call whose persistent JAX "
            "compilation cache was already filled by an earlier call of the same shapes (warm) "
            "loads them instead, so its time is close to calibration + solve alone. The first "
            "figure is the warm re-measurement where one exists, the bracket the earlier "
            "measurement (same PPL, same H-err — the runs are deterministic); rows marked (cold) "
            "were measured only on a cold cache and include compilation. calib/solve brackets: "
            "the same split in the earlier call. The cache state of each run is as given to this "
            "script (table of runs above). Rows measured both ways:"
        ),
        "",
    ]
    for r in both:
        cs = ""
        if "calib_s_cold" in r:
            cs = (
                f" (calib {r['calib_s_cold']:.1f} → {r['calib_s']:.1f}, "
                f"solve {r['solve_s_cold']:.1f} → {r['solve_s']:.1f})"
            )
        lines.append(
            f"- [{r['budget']}] {r['method']}: {r['quant_s_cold_cache']} "
            f"{r['quant_s_cold']:.1f} s ({labels[r['quant_s_cold_run']]}) → warm "
            f"{r['quant_s']:.1f} s ({r['run_label']}){cs}"
        )
    return "\n".join(lines)


def render_md(
    sources: list[Source],
    envs: list[dict[str, Any]],
    rows: list[Row],
    command: str,
    notes: list[str],
) -> str:
    """Markdown: sources, one table per budget with its verdict line, the timing note, notes."""
    cache = {s.path: s.cache for s in sources}
    labels = {s.path: s.label for s in sources}
    fp = next((r for r in rows if r["budget"] == "fp"), None)
    out = [
        "# smollm2-135m data-aware quantization, all budgets (merged)",
        "",
        "WikiText-2 test, seqlen 2048, all 148 windows"
        + (f"; fp PPL {fp['ppl']:.4f} (run {fp['run_label']})" if fp else "")
        + ". Generated by `benchmarks/merge_datawise.py` from the runs below (later runs take "
        "precedence for a (budget, method) measured twice). ΔPPL = PPL − fp PPL of the row's "
        "own run. sum H-err = Σ over the quantized linear layers of tr(EΣEᵀ)/tr(WΣWᵀ), "
        "data-free HIGGS → the method. "
        "Bold: the lowest ΔPPL of the table.",
        "",
        f"Command: `{command}`",
        "",
        "| run | date | device | compile cache | calib | sweeps / IHT rounds | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, e in zip(sources, envs):
        out.append(
            f"| {s.label} (`{s.path}`) | {e.get('date', '')} | {e.get('device', '')} | {s.cache} "
            f"| {e.get('calib_samples')} × {e.get('calib_seqlen')} | {e.get('sweeps')} / "
            f"{e.get('outlier_iters')} | `{e.get('command', '')}` |"
        )
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "fp"}, key=budget_key)
    for b in budgets:
        rs = [r for r in rows if r["budget"] == b]
        best = min((r for r in rs), key=lambda r: r["dppl"])
        runs = [s.label for s in sources if any(r["run"] == s.path for r in rs)]
        out += [
            "",
            f"## ~{b} bits/weight (runs {', '.join(runs)})",
            "",
            HEADER,
            "|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            ppl, dppl = fmt_ppl(r["ppl"]), fmt_ppl(r["dppl"], True, r["ppl"])
            name = method_label(r)
            if r is best:
                name, ppl, dppl = f"**{name}**", f"**{ppl}**", f"**{dppl}**"
            out.append(
                f"| {name} | {r['bits']:.3f} | {ppl} | {dppl} | {quant_cell(r, cache[r['run']])} "
                f"| {split_cell(r)} | {herr_cell(r)} |"
            )
        out += ["", verdict(rs)]
    out += ["", timing_note(rows, labels)]
    out += [f"\n{n}" for n in notes]
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("inputs", nargs="+", help="PATH[=LABEL[,CACHE]], in precedence order")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--rtol", type=float, default=1e-3, help="PPL agreement tolerance")
    ap.add_argument("--note", action="append", default=[], help="paragraph appended to the md")
    args = ap.parse_args(argv)
    if args.rtol <= 0:
        raise ValueError(f"--rtol must be positive, got {args.rtol}")
    sources = [parse_source(a) for a in args.inputs]
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"input labels must be distinct, got {labels}")
    loaded = [(s, json.loads(Path(s.path).read_text())) for s in sources]
    rows, agree, disagree = merge(loaded, args.rtol)
    for line in agree:
        print("agree:   ", line)
    if disagree:
        for line in disagree:
            print("DISAGREE:", line, file=sys.stderr)
        print(
            f"{len(disagree)} PPL disagreement(s) above rtol {args.rtol}; nothing written",
            file=sys.stderr,
        )
        return 1
    runs = [dict(d["env"], source=s.path, label=s.label, compile_cache=s.cache) for s, d in loaded]
    Path(args.out_json).write_text(json.dumps({"runs": runs, "rows": rows}, indent=1) + "\n")
    command = "python benchmarks/merge_datawise.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    md = render_md(sources, [d["env"] for _, d in loaded], rows, command, args.note)
    Path(args.out_md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
