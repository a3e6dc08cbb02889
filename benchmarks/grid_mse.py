"""Gaussian MSE of every shipped grid vs the SPEC reference grids and the rate-distortion bound.

    PYTHONPATH=. python benchmarks/grid_mse.py [--samples 4194304] [--seed 2024]

Prints a table, writes `benchmarks/results/grid_mse.json` and a markdown snippet
`benchmarks/results/grid_mse.md` (for benchmarks/RESULTS.md). MSE is per coordinate,
E|x - q(x)|^2 / p for x ~ N(0, I_p), measured with `grids.grid_mse` (exact nearest point) on fresh
samples whose seed differs from the generation (training) seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax

from higgs_jax import grids

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1 << 22)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    command = "PYTHONPATH=. python benchmarks/grid_mse.py"
    if args.samples != 1 << 22 or args.seed != 2024:
        command += f" --samples {args.samples} --seed {args.seed}"

    rows = []
    hdr = f"{'p':>2} {'n':>5} {'bits':>6} {'MSE':>10} {'SPEC MSE':>9} {'ratio':>6} {'4^-b':>10} {'/bound':>6} {'s':>5}"
    print(hdr)
    for p, n in grids.available_grids():
        spec = grids.gauss_grid(p, n)
        t0 = time.time()
        mse = grids.grid_mse(spec, num_samples=args.samples, seed=args.seed)
        dt = time.time() - t0
        ref = grids.SPEC_GRID_MSE.get((p, n))
        bound = 4.0 ** (-spec.bits)
        row = {
            "p": p, "n": n, "bits": spec.bits, "mse": mse, "spec_mse": ref,
            "ratio_to_spec": None if ref is None else mse / ref,
            "rd_bound": bound, "ratio_to_bound": mse / bound, "seconds": round(dt, 2),
        }  # fmt: skip
        rows.append(row)
        ref_s = f"{ref:9.5f}" if ref is not None else f"{'-':>9}"
        ratio_s = f"{mse / ref:6.3f}" if ref is not None else f"{'-':>6}"
        print(
            f"{p:2d} {n:5d} {spec.bits:6.3f} {mse:10.6f} {ref_s} {ratio_s} {bound:10.6f}"
            f" {mse / bound:6.3f} {dt:5.1f}",
            flush=True,
        )

    meta = {
        "command": command,
        "samples": args.samples,
        "seed": args.seed,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grid_mse.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    md = [
        (
            f"`{command}`  ({meta['date']}, {meta['machine']}, jax {meta['jax']}; "
            f"{args.samples} fresh N(0, I_p) samples per grid, seed {args.seed})"
        ),
        "",
        "| p | n | bits | MSE (measured) | SPEC MSE | ratio | 4^-b | MSE / 4^-b |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = f"{r['spec_mse']:.5g}" if r["spec_mse"] is not None else "-"
        ratio = f"{r['ratio_to_spec']:.3f}" if r["ratio_to_spec"] is not None else "-"
        md.append(
            f"| {r['p']} | {r['n']} | {r['bits']:.3g} | {r['mse']:.5g} | {ref} | {ratio} | "
            f"{r['rd_bound']:.4g} | {r['ratio_to_bound']:.3f} |"
        )
    (args.out / "grid_mse.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'grid_mse.json'} and {args.out / 'grid_mse.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
