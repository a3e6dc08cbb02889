"""Kernel-variant sweep for the Pallas HIGGS matmul, made to run under Nsight Compute (ncu).

Launches the kernel once per variant (grid x decoder x tiling) on random weights, in a fixed
order, and writes that order to --out/variants.json. Run it under
``ncu --csv --metrics ... -k regex:higgs_matmul`` and join the CSV with the variant list by launch
order (`--join NCU_CSV`): every variant then has its kernel-only device time measured by the
profiler (cold L2: ncu flushes caches between passes by default), its instruction count per
weight, registers, occupancy and issue utilisation — the numbers that say *why* a variant is slow.

Usage (GPU):
  ncu --csv --clock-control none -k regex:higgs_matmul --metrics METRICS \\
      python benchmarks/kernel_profile.py --out OUT > OUT/ncu.csv
  python benchmarks/kernel_profile.py --join OUT/ncu.csv --out OUT
CPU smoke (interpret mode, tiny shape): python benchmarks/kernel_profile.py --smoke --out /tmp/kp
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_bench import random_weight
from pallas_kernels.higgs_matmul import default_config
from pallas_kernels.higgs_matmul.config import split_k_for, wide_config
from pallas_kernels.higgs_matmul import wrapper as _wrapper
from pallas_kernels.higgs_matmul.repack import SUPPORTED

METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "smsp__inst_executed.sum",
    "launch__registers_per_thread",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed_pipe_lsu.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum",
)

PROFILE_PATHS = ("default", "gemv", "fma", "fma_tiles", "dot", "wide")
GRIDS = {"p1_2b": (1, 4), "p1_3b": (1, 8), "p1_4b": (1, 16), "p2_2b": (2, 16), "p2_3b": (2, 64), "p2_4b": (2, 256)}


def variants(
    k: int, n: int, m: int, grids: list[str], defaults_only: bool = False, paths=("gemv", "fma")
) -> list[dict]:
    """Per grid and requested path: the gemv kernel's default and its neighbours, the plane
    kernel's fma default (M <= 8), the plane kernel's dot default (and half its K tile), and the
    wide path's `wide_config` with a tiling/warps/decoder sweep around it."""
    out = []
    for name in grids:
        p, ng = GRIDS[name]
        base = default_config(m, k, n, p, 0)
        cb = SUPPORTED[(p, ng)]
        cfgs = []
        if "gemv" in paths and cb in (2, 4, 8):
            g = dataclasses.replace(base, path="gemv", block_k=(8 if cb <= 4 else 4) * 32 * p)
            for lookup in ("code", "byte"):
                for vol in (False, True):
                    b = dataclasses.replace(g, decode=lookup, volatile=vol)
                    cfgs.append(b)
                    if not defaults_only:
                        cfgs.append(dataclasses.replace(b, block_k=b.block_k // 2))
                        cfgs.append(dataclasses.replace(b, split_k=b.split_k * 2))
        if "default" in paths:  # what higgs_matmul_pallas runs (decode "auto")
            cfgs.append(base)
        if "fma" in paths and m <= 8:
            dec = "gather_pair" if (p == 2 or cb in (2, 4)) else "gather"
            cfgs.append(dataclasses.replace(base, path="fma", decode=dec))
        if "fma_tiles" in paths and m <= 8:
            # M <= 8 tiling sweep (units per step x columns per program), split-K as the
            # default heuristic picks it for that tiling: small shapes have few steps per column
            units = -(-(-(-k // p)) // 32)
            dec = "gather_pair" if (p == 2 or cb in (2, 4)) else "gather"
            for bku in (2, 4, 8, 16):
                for bn in (32, 64, 128):
                    split = split_k_for(-(-units // bku), -(-n // bn))
                    cfgs.append(
                        dataclasses.replace(
                            base, path="fma", decode=dec, block_k=bku * 32 * p, block_n=bn,
                            split_k=split,
                        )
                    )
        if "dot" in paths:
            d = default_config(max(m, 16), k, n, p, 0)
            cfgs.append(dataclasses.replace(d, path="dot"))
            if not defaults_only:  # the dot path needs >= 16 units per step: try 32
                cfgs.append(dataclasses.replace(d, path="dot", block_k=d.block_k * 2))
        if "wide" in paths:
            w = wide_config(m, k, n, p, 0)
            cfgs.append(w)
            if not defaults_only:
                # tile K (units per step) x columns, one stage (the register tile is the issue),
                # then warps/stages/decoder neighbours of the middle point
                for bku in (1, 2, 4):
                    for bn in (32, 64, 128):
                        cfgs.append(
                            dataclasses.replace(
                                w, block_k=bku * 32 * p, block_n=bn, num_stages=1
                            )
                        )
                mid = dataclasses.replace(w, block_k=2 * 32 * p, block_n=64, num_stages=1)
                cfgs.append(dataclasses.replace(mid, num_warps=8))
                cfgs.append(dataclasses.replace(mid, num_warps=2))
                cfgs.append(dataclasses.replace(mid, decode="gather"))
                if p == 1:
                    cfgs.append(dataclasses.replace(mid, decode="poly"))
                cfgs.append(dataclasses.replace(mid, split_k=max(1, mid.split_k // 4)))
        for c in cfgs:
            out.append({"grid": name, "p": p, "n": ng, "k": k, "cols": n, "m": m, **c.to_dict()})
    return out


def run_variants(vs: list[dict], interpret: bool) -> None:
    from pallas_kernels.higgs_matmul.config import Config

    key = jax.random.key(0)
    weights = {}
    for i, v in enumerate(vs):
        wk = (v["p"], v["n"], v["k"], v["cols"])
        if wk not in weights:
            weights.clear()
            weights[wk] = random_weight(key, v["k"], v["cols"], v["p"], v["n"])
        kw = weights[wk]
        cfg = Config.from_dict({f.name: v[f.name] for f in dataclasses.fields(Config)})
        x = jax.random.normal(jax.random.key(i), (v["m"], kw.K), jnp.bfloat16)
        t0 = time.perf_counter()
        try:
            x, xblk = _wrapper.prepare_activations(x, kw, cfg, v["m"], jnp.bfloat16)
            fn = jax.jit(
                lambda a, w, c=cfg, m=v["m"], xb=xblk: _wrapper.launch_kernel(
                    a, xb, w, c, m, jnp.bfloat16, interpret
                )
            )
            fn(x, kw).block_until_ready()
            v["ok"] = True
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported
            v["ok"] = False
            v["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        v["compile_s"] = time.perf_counter() - t0
        print(f"# {i:3d} {v['grid']} {v['path']} {v['decode']:11s} vol={v.get('volatile')} bn={v['block_n']} bk={v['block_k']} "
              f"w={v['num_warps']} st={v['num_stages']} sk={v['split_k']} ok={v['ok']} "
              f"{v['compile_s']:.1f}s", file=sys.stderr, flush=True)


def time_variants(vs: list[dict], save=None) -> None:
    """Full op (rotation + kernel) with the benchmark's fori_loop timing, plus torch bf16."""
    from benchmarks.kernel_bench import n_copies, torch_matmul_time, weight_bytes
    from pallas_kernels.higgs_matmul import higgs_matmul_pallas
    from pallas_kernels.higgs_matmul.autotune import time_device
    from pallas_kernels.higgs_matmul.config import Config

    shapes = sorted({(v["k"], v["cols"], v["m"]) for v in vs})
    for k, n, m in shapes:
        t = torch_matmul_time(m, k, n)
        print(f"torch bf16 {k}x{n} M={m}: {t * 1e6 if t else float('nan'):.1f} us", flush=True)
    for i, v in enumerate(vs):
        cfg = Config.from_dict({f.name: v[f.name] for f in dataclasses.fields(Config)})
        kw0 = random_weight(jax.random.key(i), v["k"], v["cols"], v["p"], v["n"])
        kws = [kw0] + [
            random_weight(jax.random.key(1000 + i * 10 + j), v["k"], v["cols"], v["p"], v["n"])
            for j in range(1, n_copies(weight_bytes(kw0)))
        ]
        x = jax.random.normal(jax.random.key(7), (v["m"], v["k"]), jnp.bfloat16)
        t0 = time.perf_counter()
        try:
            t = time_device(lambda a, w, c=cfg: higgs_matmul_pallas(a, w, config=c), x, kws, 64)
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
            v["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"failed {v['grid']} {v['path']} bn={v['block_n']} bk={v['block_k']}: {v['error']}")
            continue
        v["full_us"] = t * 1e6
        if save is not None:
            save()
        print(f"full op {v['grid']} {v['path']} {v['decode']} {v['k']}x{v['cols']} M={v['m']}: {t * 1e6:.1f} us "
              f"(copies {len(kws)}, compile+time {time.perf_counter() - t0:.1f} s)", flush=True)


def join(csv_path: Path, vs: list[dict]) -> list[dict]:
    text = csv_path.read_text()
    start = text.find('"ID"')
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    by_id: dict[int, dict] = {}
    for r in rows:
        by_id.setdefault(int(r["ID"]), {})[r["Metric Name"]] = r["Metric Value"].replace(",", "")
    ok = [v for v in vs if v.get("ok")]
    if len(by_id) != len(ok):
        print(f"warning: {len(by_id)} profiled launches for {len(ok)} variants", file=sys.stderr)
    for v, (_, met) in zip(ok, sorted(by_id.items())):
        t_ns = float(met.get("gpu__time_duration.sum", "nan"))
        weights = v["k"] * v["cols"]
        v["us"] = t_ns / 1e3
        v["dram_GBps"] = float(met.get("dram__bytes_read.sum", "nan")) / t_ns
        v["inst_per_weight"] = float(met.get("smsp__inst_executed.sum", "nan")) * 32 / weights
        v["lsu_per_weight"] = float(met.get("smsp__inst_executed_pipe_lsu.sum", "nan")) * 32 / weights
        v["regs"] = met.get("launch__registers_per_thread")
        v["occupancy_pct"] = met.get("sm__warps_active.avg.pct_of_peak_sustained_active")
        v["issue_pct"] = met.get("smsp__issue_active.avg.pct_of_peak_sustained_active")
        v["smem_wavefronts"] = met.get("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum")
        v["local_ld_sectors"] = met.get("l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum")
    return vs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="8192x28672", help="KxN[,KxN...]")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--grids", default="p1_4b,p2_4b,p1_2b,p2_2b")
    ap.add_argument("--join", default=None, help="ncu CSV to join with OUT/variants.json")
    ap.add_argument("--defaults-only", action="store_true", help="default tiling per decoder")
    ap.add_argument("--time", action="store_true", help="time the full op (fori_loop) instead")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, interpret mode (CPU)")
    ap.add_argument(
        "--paths", default="gemv,fma", help="kernel paths to sweep: default (default_config, decode auto), gemv, fma, "
        "fma_tiles (M <= 8 tiling sweep), dot, wide"
    )
    args = ap.parse_args(argv)
    bad = [t for t in args.paths.split(",") if t not in PROFILE_PATHS]
    if bad:
        ap.error(f"--paths: unknown entries {bad} in {args.paths!r}; choose from {PROFILE_PATHS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.join:
        vs = join(Path(args.join), json.loads((out / "variants.json").read_text()))
        (out / "variants_joined.json").write_text(json.dumps(vs, indent=1))
        vs = sorted((v for v in vs if "us" in v), key=lambda v: (v["k"], v["grid"], v["us"]))
        print("| K x N | grid | path | decode | bn | bk | warps | stages | split | us | DRAM GB/s | inst/w | lsu/w | regs | occ% | issue% | smem wavefronts | local-ld sectors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for v in vs:
            print(f"| {v['k']}x{v['cols']} | {v['grid']} | {v['path']} | {v['decode']}{' vol' if v.get('volatile') else ''} | {v['block_n']} | {v['block_k']} | {v['num_warps']} | "
                  f"{v['num_stages']} | {v['split_k']} | {v['us']:.1f} | {v['dram_GBps']:.0f} | "
                  f"{v['inst_per_weight']:.2f} | {v['lsu_per_weight']:.2f} | {v['regs']} | "
                  f"{v['occupancy_pct']} | {v['issue_pct']} | {v.get('smem_wavefronts')} | "
                  f"{v.get('local_ld_sectors')} |")
        return 0
    shapes = [tuple(int(t) for t in sh.split("x")) for sh in args.shape.split(",")]
    if args.smoke:
        shapes = [(1024, 256)]
    vs = []
    for k, n in shapes:
        vs += variants(
            k, n, args.m, args.grids.split(","), args.defaults_only, args.paths.split(",")
        )
    if args.smoke:
        vs = vs[:3]
    if args.time:
        time_variants(vs, save=lambda: (out / "timed.json").write_text(json.dumps(vs, indent=1)))
        print("| K x N | M | grid | path | decode | bn | bk | warps | stages | split | full op us |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for v in sorted(
            (v for v in vs if "full_us" in v), key=lambda v: (v["k"], v["cols"], v["grid"], v["full_us"])
        ):
            print(
                f"| {v['k']}x{v['cols']} | {v['m']} | {v['grid']} | {v['path']} | {v['decode']} | "
                f"{v['block_n']} | {v['block_k']} | {v['num_warps']} | {v['num_stages']} | "
                f"{v['split_k']} | {v['full_us']:.1f} |"
            )
        return 0
    run_variants(vs, interpret=args.smoke)
    (out / "variants.json").write_text(json.dumps(vs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
