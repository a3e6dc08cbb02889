"""Relative error t^2 of HIGGS vs RTN / NF4 on synthetic matrices, and CPU quantization throughput.

(a) i.i.d. Gaussian and (b) heavy-tailed Student-t (nu = 3) matrices, 4096 x 4096 by default.
For every shipped grid with 2 <= bits <= 4 and every Hadamard size h, HIGGS's t^2 is reported next
to its grid's Gaussian MSE (the claim: within 3%), and RTN / NF4 at comparable bits/weight.
Throughput: MB of f32 weights quantized per second (after compilation) for 4096x4096 and
14336x4096.

  python benchmarks/quant_error.py [--size 4096] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higgs_jax import grids  # noqa: E402
from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig  # noqa: E402
from higgs_jax.quantize import quantize_with_error  # noqa: E402


def higgs_specs(hs):
    out = []
    for p, n in grids.available_grids():
        b = grids.GridSpec("gauss", p, n).bits
        if 2 <= b <= 4 and b == int(b):
            # p = 3 needs h divisible by 3: use the Paley-based orders 3/4 of the requested ones
            for h in (hs if p != 3 else [h * 3 // 4 for h in hs]):
                out.append(HiggsConfig(bits=int(b), p=p, hadamard_size=h))
    return out


def baseline_specs():
    return [NF4Config(block_size=64)] + [RTNConfig(bits=b, group_size=g)
                                         for b in (2, 3, 4) for g in (64, 128)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--hadamard", default="64,256,1024")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args(argv)
    hs = [int(h) for h in args.hadamard.split(",")]
    k = jax.random.key(0)
    mats = {
        "gaussian": jax.random.normal(k, (args.size, args.size), jnp.float32),
        "student-t(3)": jax.random.t(jax.random.fold_in(k, 1), 3.0, (args.size, args.size)),
    }
    rows = []
    for spec in higgs_specs(hs) + baseline_specs():
        row = {"spec": spec.describe(), "method": spec.method}
        for name, w in mats.items():
            qt, t2 = quantize_with_error(w, spec, axis=0)
            row[name] = t2
            row["bits"] = qt.bits_per_weight
        if spec.method == "higgs":
            ref = grids.SPEC_GRID_MSE.get((spec.p, spec.n))
            row["grid_mse"] = ref if ref is not None else grids.grid_mse(spec.grid, 1 << 20)
            row["ratio_gauss"] = row["gaussian"] / row["grid_mse"]
            row["ratio_t3"] = row["student-t(3)"] / row["grid_mse"]
        rows.append(row)
        print(f"{row['spec']:36s} bits {row['bits']:6.3f}  t2 gauss {row['gaussian']:.5f}  "
              f"t2 t(3) {row['student-t(3)']:.5f}" + (
                  f"  grid {row['grid_mse']:.5f}  ratio {row['ratio_gauss']:.3f}/{row['ratio_t3']:.3f}"
                  if "grid_mse" in row else ""), flush=True)

    thr = []
    if not args.skip_throughput:
        for shape in ((4096, 4096), (14336, 4096)):
            w = jax.random.normal(k, shape, jnp.float32)
            for spec in (HiggsConfig(bits=4, p=2, hadamard_size=512),
                         HiggsConfig(bits=4, p=1, hadamard_size=512),
                         HiggsConfig(bits=3, p=4, hadamard_size=512) if (4, 4096) in grids.available_grids() else None,
                         NF4Config()):
                if spec is None:
                    continue
                quantize_with_error(w, spec, axis=0)  # compile
                t0 = time.perf_counter()
                quantize_with_error(w, spec, axis=0)
                dt = time.perf_counter() - t0
                thr.append({"shape": list(shape), "spec": spec.describe(), "seconds": dt,
                            "MB_per_s": w.size * 4 / 1e6 / dt})
                print(f"throughput {shape} {spec.describe():32s} {dt:6.2f}s "
                      f"{thr[-1]['MB_per_s']:7.1f} MB/s", flush=True)

    env = {"machine": platform.processor() or platform.machine(), "jax": jax.__version__,
           "backend": jax.default_backend(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python " + " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_error.json").write_text(json.dumps({"env": env, "rows": rows, "throughput": thr},
                                                     indent=1))
    lines = [f"Command: `{env['command']}` — {env['backend']} ({env['machine']}), jax {env['jax']}, "
             f"{env['date']}. Matrices {args.size}x{args.size}; t^2 = ||W_hat - W||^2/||W||^2.", "",
             "| spec | bits/w | t² Gaussian | t² Student-t(3) | grid MSE | t²/MSE (Gauss) | t²/MSE (t3) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['grid_mse']:.5f} | {r['ratio_gauss']:.3f} | {r['ratio_t3']:.3f}"
                 if "grid_mse" in r else "- | - | -")
        lines.append(f"| {r['spec']} | {r['bits']:.3f} | {r['gaussian']:.5f} | "
                     f"{r['student-t(3)']:.5f} | {extra} |")
    if thr:
        lines += ["", "| shape | spec | seconds | MB/s (f32 weights) |", "|---|---|---|---|"]
        for t in thr:
            lines.append(f"| {t['shape'][0]}x{t['shape'][1]} | {t['spec']} | {t['seconds']:.2f} | "
                         f"{t['MB_per_s']:.1f} |")
    (out / "quant_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
