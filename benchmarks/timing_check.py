"""How much of a `time_device` figure is the timing loop itself (GPU).

`autotune.time_device` unrolls ``calls_per_iteration`` calls in each iteration of a jitted
`lax.fori_loop`; at every iteration boundary the trip predicate goes back to the host, and the GPU
waits for the host to launch the next iteration. This script times the same op with several
``calls_per_iteration`` values (a per-iteration cost X shows up as X / calls per call) and reads
the op's own kernel time from a profiler trace (`op_profile.profile_case`: busy device time per
call, the idle time at the loop's iteration boundaries left out), next to cuBLAS through torch
(CUDA graph of back-to-back calls, CUDA events) and `jnp.dot` in bf16.

Usage (GPU): PYTHONPATH=. python benchmarks/timing_check.py --out $OUT \
                 --cases 8192x28672:1:p1_4b:default 4096x4096:1:p1_4b:default --cpi 32 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_bench import n_copies, torch_matmul_time  # noqa: E402
from benchmarks.op_profile import Case, build_case, profile_case  # noqa: E402
from pallas_kernels.higgs_matmul import higgs_matmul_pallas  # noqa: E402
from pallas_kernels.higgs_matmul.autotune import time_device  # noqa: E402


def time_case(case: Case, cpis: list[int], reps: int, key) -> dict:
    cfg, kws, x = build_case(case, key)
    row: dict = {"case": case.label, "copies": len(kws)}
    for c in cpis:
        t = time_device(
            lambda a, w: higgs_matmul_pallas(a, w, config=cfg), x, kws, max(reps, c),
            calls_per_iteration=c,
        )
        row[f"op_cpi{c}_us"] = t * 1e6
        print(f"{case.label}: op, {c} calls per iteration: {t * 1e6:.2f} us", flush=True)
    wb = [
        jax.random.normal(jax.random.fold_in(key, 200 + i), (case.k, case.n), jnp.bfloat16)
        for i in range(n_copies(case.k * case.n * 2))
    ]
    for c in cpis:
        t = time_device(lambda a, w: jnp.dot(a, w), x, wb, max(reps, c), calls_per_iteration=c)
        row[f"jnp_dot_cpi{c}_us"] = t * 1e6
        print(f"{case.label}: jnp.dot bf16, {c} calls per iteration: {t * 1e6:.2f} us", flush=True)
    del wb
    prof = profile_case(case, max(reps, 64), key)
    row["op_trace_busy_us"] = prof["busy_us_per_step"]
    row["op_trace_span_us"] = prof["span_us_per_step"]
    row["op_trace_kernels"] = {
        v["name"]: v["mean_us"] for v in prof["names"] if v["count_per_step"] >= 0.5
    }
    t = torch_matmul_time(case.m, case.k, case.n)
    row["torch_us"] = None if t is None else t * 1e6
    return row


def render(rows: list[dict], cpis: list[int]) -> str:
    head = ["case", "torch"] + [f"op, {c}/iter" for c in cpis]
    head += ["op, trace busy", "op, trace span"]
    head += [f"jnp.dot, {c}/iter" for c in cpis]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["case"], "-" if r["torch_us"] is None else f"{r['torch_us']:.1f}"]
        cells += [f"{r[f'op_cpi{c}_us']:.1f}" for c in cpis]
        cells += [f"{r['op_trace_busy_us']:.1f}", f"{r['op_trace_span_us']:.1f}"]
        cells += [f"{r[f'jnp_dot_cpi{c}_us']:.1f}" for c in cpis]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="+", default=["8192x28672:1:p1_4b:default"])
    ap.add_argument("--cpi", nargs="+", type=int, default=[32, 128], help="calls per iteration")
    ap.add_argument("--reps", type=int, default=128)
    args = ap.parse_args(argv)
    cases = [Case.parse(c) for c in args.cases]
    if any(c < 1 for c in args.cpi):
        ap.error(f"--cpi values must be >= 1, got {args.cpi}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if jax.default_backend() != "gpu":
        print("timing_check: no GPU; nothing to time")
        return 0
    rows = []
    meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "cpi": args.cpi, "reps": args.reps}
    for i, case in enumerate(cases):
        rows.append(time_case(case, args.cpi, args.reps, jax.random.key(i)))
        (out / "timing_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "timing_check.md").write_text(render(rows, args.cpi))
    print(render(rows, args.cpi))
    return 0


if __name__ == "__main__":
    sys.exit(main())
