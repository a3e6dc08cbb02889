"""Which implementation should `higgs_matmul(implementation="auto")` pick per grid? (GPU)

For each HIGGS grid (p, bits) and (K, N) shape, times the two implementations of the same op on
the same random `HiggsTensor` (library layout: h = 512, one bf16 scale per block):
- "xla": `higgs_matmul_xla` (rotate x, decode the whole weight, f32 dot);
- "pallas": `higgs_matmul_pallas` on the weight repacked once (`repack`), default config.
Both checked against each other once (relative Frobenius error), timed the same way as
kernel_bench.py (`autotune.time_device`: >= 32 calls per fori_loop iteration, several weight
copies against the L2). Prints one table; writes route_bench.{json,md} to --out.

Usage (GPU): PYTHONPATH=. python benchmarks/route_bench.py --out $OUT [--grids p4_3b p2_4b]
CPU smoke:   PYTHONPATH=. python benchmarks/route_bench.py --out /tmp/rb --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_bench import _higgs_leaf  # noqa: E402
from benchmarks.kernel_bench import check_sweep_args, n_copies  # noqa: E402
from higgs_jax.config import HiggsConfig  # noqa: E402
from higgs_jax.matmul import higgs_matmul_xla  # noqa: E402
from pallas_kernels.higgs_matmul import higgs_matmul_pallas, repack  # noqa: E402
from pallas_kernels.higgs_matmul.autotune import time_device  # noqa: E402

GRIDS = {"p2_4b": (2, 4), "p2_2b": (2, 2), "p4_2b": (4, 2), "p4_3b": (4, 3), "p2_3b": (2, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--grids", nargs="+", default=["p4_3b", "p4_2b", "p2_4b"], choices=sorted(GRIDS)
    )
    ap.add_argument("--shapes", nargs="+", default=["8192x28672", "4096x4096"])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, interpret mode (CPU)")
    args = ap.parse_args(argv)
    shapes = check_sweep_args(ap, args.m, args.reps, ["512x256"] if args.smoke else args.shapes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": str(getattr(jax.devices()[0], "device_kind", jax.devices()[0].platform)),
        "jax": jax.__version__,
        "command": "PYTHONPATH=. python benchmarks/route_bench.py "
        + " ".join(argv or sys.argv[1:]),
        "m": args.m,
    }
    rows: list[dict] = []
    t0 = time.perf_counter()
    for gname in args.grids:
        p, bits = GRIDS[gname]
        spec = HiggsConfig(bits=bits, p=p)
        for k, n in shapes:
            if time.perf_counter() - t0 > args.budget_s:
                print("budget exhausted", flush=True)
                break
            row: dict = {"grid": gname, "k": k, "n": n}
            key = jax.random.key(k + n + p * 7 + bits)
            qt = _higgs_leaf(key, k, n, spec, False)
            copies = 1 if args.smoke else n_copies(qt.codes.size * 4)
            qts = [qt] + [
                _higgs_leaf(jax.random.fold_in(key, i), k, n, spec, False) for i in range(1, copies)
            ]
            kws = [jax.jit(repack)(q) for q in qts]
            x = jax.random.normal(jax.random.fold_in(key, 99), (args.m, k), jnp.bfloat16)
            try:
                ya = np.asarray(higgs_matmul_xla(x, qt), np.float64)
                yb = np.asarray(higgs_matmul_pallas(x, kws[0], interpret=args.smoke), np.float64)
                row["rel_diff"] = float(np.linalg.norm(yb - ya) / np.linalg.norm(ya))
                if row["rel_diff"] > 2e-2:
                    raise AssertionError(f"pallas vs xla rel diff {row['rel_diff']:.2e}")
                if not args.smoke:
                    xla_fn = jax.jit(higgs_matmul_xla)
                    row["xla_us"] = time_device(xla_fn, x, qts, args.reps) * 1e6
                    pal_fn = lambda a, w: higgs_matmul_pallas(a, w)  # noqa: E731
                    row["pallas_us"] = time_device(pal_fn, x, kws, args.reps) * 1e6
            except Exception as e:  # noqa: BLE001 - reported in the table
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            (out / "route_bench.json").write_text(
                json.dumps({"meta": meta, "rows": rows}, indent=1)
            )
            print(row, flush=True)
    lines = [
        f"# higgs_matmul implementations, M={args.m} ({meta['date']}, {meta['device']})",
        "",
        "| grid | K x N | xla us | pallas us | faster | rel diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "xla_us" in r:
            best = "pallas" if r["pallas_us"] < r["xla_us"] else "xla"
            lines.append(
                f"| {r['grid']} | {r['k']}x{r['n']} | {r['xla_us']:.1f} | {r['pallas_us']:.1f} | "
                f"{best} | {r['rel_diff']:.1e} |"
            )
        else:
            lines.append(
                f"| {r['grid']} | {r['k']}x{r['n']} | - | - | - | "
                f"{r.get('error', '%.1e (no timing)' % r.get('rel_diff', float('nan')))} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "route_bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
