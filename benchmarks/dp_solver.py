"""Speed of the allocation DP solver: (layers, options, bins) -> seconds.

Usage:
  PYTHONPATH=. python benchmarks/dp_solver.py [--repeats 7] [--out benchmarks/results]

For each shape: a synthetic problem shaped like real HIGGS allocation (bits 1.5..8 per option,
errors ~ exp(-1.4 bits) with noise, random alphas and layer sizes), a budget 30% of the way
from the cheapest to the most expensive plan (so the DP actually runs). Times, all after a warm-up
call that compiles (compile time reported separately), median of --repeats runs:
  core:   the jitted forward scan + backtrack on device arrays (block_until_ready),
  solve:  `solve(..., refine=False)`: validation, discretisation, padding, DP, plan,
  refine: `solve(...)` with the greedy real-cost refinement (the default).
Writes `dp_solver.json` and `dp_solver.md` into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax.allocation import dp

SHAPES = [  # (layers, options, bins)
    (210, 16, 1000),  # smollm2-135m: 30 blocks x 7 linear layers
    (210, 16, 2000),
    (500, 20, 1000),
    (500, 20, 2000),  # the target: < 1 s after compilation
    (500, 20, 4000),
    (1000, 20, 4000),
    (500, 40, 2000),
    (2000, 20, 8000),
]


def make_problem(layers: int, options: int, seed: int = 0) -> dp.AllocationProblem:
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.uniform(1.5, 8.0, size=(layers, options)), axis=1)
    errors = np.exp(-1.4 * bits) * rng.uniform(0.8, 1.2, size=(layers, options))
    return dp.AllocationProblem(
        alphas=rng.uniform(0.05, 5.0, layers),
        errors=errors,
        bits=bits,
        sizes=rng.integers(10**5, 10**7, layers),
    )


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return first, runs


def bench(layers: int, options: int, bins: int, repeats: int) -> dict:
    problem = make_problem(layers, options)
    lo, hi = problem.feasible_range()
    budget = lo + 0.3 * (hi - lo)
    costs, capacity = dp.discretize(problem, budget, bins)
    # The same padded arrays `solve` builds, so `core` times exactly the compiled DP.
    L, J = problem.num_layers, problem.num_options
    lp, jp, t = dp._round_up(L, 8), dp._round_up(J, 4), dp._round_up(capacity + 1, 128)
    w = np.full((lp, jp), np.inf)
    w[:L, :J] = problem.weighted_errors
    w[L:, 0] = 0.0
    c = np.full((lp, jp), t, dtype=np.int64)
    c[:L, :J] = np.minimum(costs, capacity + 1)
    c[L:, 0] = 0
    with jax.enable_x64(True):
        args = (jnp.asarray(w), jnp.asarray(c), jnp.asarray(capacity, jnp.int64))
        compile_s, core = timed(lambda: dp._dp(*args, table_size=t), repeats)
    _, plain = timed(
        lambda: dp.solve(problem, budget, num_bins=bins, refine=False).choices, repeats
    )
    _, refined = timed(lambda: dp.solve(problem, budget, num_bins=bins).choices, repeats)
    p_plain = dp.solve(problem, budget, num_bins=bins, refine=False)
    p_ref = dp.solve(problem, budget, num_bins=bins)
    return {
        "layers": layers,
        "options": options,
        "bins": bins,
        "budget_bits": budget,
        "first_call_s": compile_s,
        "core_s": statistics.median(core),
        "solve_s": statistics.median(plain),
        "solve_refine_s": statistics.median(refined),
        "core_runs_s": core,
        "solve_runs_s": plain,
        "solve_refine_runs_s": refined,
        "dp_avg_bits": p_plain.avg_bits,
        "dp_predicted": p_plain.predicted,
        "refine_avg_bits": p_ref.avg_bits,
        "refine_predicted": p_ref.predicted,
        "refine_method": p_ref.method,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--note", default="", help="free text added to the report (e.g. setup)")
    args = ap.parse_args(argv)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.default_backend()}"
    )
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
        if model:
            machine = (
                f"{model}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
                f"on {jax.default_backend()}"
            )
    except OSError:
        pass
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "PYTHONPATH=. python benchmarks/dp_solver.py" + (
        f" --repeats {args.repeats}" if args.repeats != 7 else ""
    )
    load_before = os.getloadavg()[0]
    rows = []
    header = (
        f"{'layers':>6} {'opts':>4} {'bins':>5} {'compile':>8} {'core':>8} {'solve':>8} "
        f"{'+refine':>8}   dPPL dp -> refined (avg bits)"
    )
    print(header)
    for shape in SHAPES:
        r = bench(*shape, repeats=args.repeats)
        rows.append(r)
        print(
            f"{r['layers']:6d} {r['options']:4d} {r['bins']:5d} {r['first_call_s']:8.3f} "
            f"{r['core_s']:8.4f} {r['solve_s']:8.4f} {r['solve_refine_s']:8.4f}   "
            f"{r['dp_predicted']:.4f} ({r['dp_avg_bits']:.3f}) -> "
            f"{r['refine_predicted']:.4f} ({r['refine_avg_bits']:.3f})",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    load = (
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"(shared machine: other jobs were running)"
    )
    meta = {
        "load": load,
        "command": command,
        "machine": machine,
        "date": date,
        "repeats": args.repeats,
        "note": args.note,
        "statistic": "median after one warm-up (compiling) call",
    }
    (args.out / "dp_solver.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [
        "### DP allocation solver speed",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}",
        f"- Date: {date}; {load}",
        *([f"- Note: {args.note}"] if args.note else []),
        (
            f"- Median of {args.repeats} runs after a warm-up call; `compile` = first call (jit "
            "compilation + one run). `core` = jitted forward `lax.scan` + backtrack; `solve` = "
            "`solve(refine=False)` end to end; `+refine` = `solve()` with the greedy real-cost "
            "refinement (default). Synthetic problems, budget 30% of the way from the cheapest to "
            "the most expensive plan. Seconds."
        ),
        "",
        (
            "| layers | options | bins | compile (s) | core (s) | solve (s) | solve+refine (s) "
            "| objective dp -> refined | avg bits dp -> refined (budget) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['layers']} | {r['options']} | {r['bins']} | {r['first_call_s']:.3f} | "
            f"{r['core_s']:.4f} | {r['solve_s']:.4f} | {r['solve_refine_s']:.4f} | "
            f"{r['dp_predicted']:.4f} -> {r['refine_predicted']:.4f} | "
            f"{r['dp_avg_bits']:.3f} -> {r['refine_avg_bits']:.3f} "
            f"({r['budget_bits']:.3f}) |"
        )
    (args.out / "dp_solver.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'dp_solver.json'} and {args.out / 'dp_solver.md'}")


if __name__ == "__main__":
    main()
