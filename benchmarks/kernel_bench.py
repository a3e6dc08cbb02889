"""Benchmark of the Pallas HIGGS matmul against bf16 baselines (standalone script).

Checks correctness first (kernel vs plain-jnp reference on random weights), then times every
contender the same way and prints one short table last. Writes JSON (+ a markdown table) to
$OUT (if set) and to --results-dir.

Contenders per (K, N, M): jnp.dot bf16 (XLA), PyTorch bf16 matmul (cuBLAS, if torch is
installed), XLA dequantize-then-dot (4-bit p=2), and our kernel for every (p, bits), timed as the
full op (rotation + LUT matmul) and as the kernel alone (pre-rotated activations).

Timing: JAX device time = R back-to-back calls in one jitted fori_loop / R (see
`pallas_kernels.higgs_matmul.autotune.time_device`), cycling through copies of the weights so
that they are not served from L2; PyTorch: CUDA graph of R calls (same copies) timed with CUDA
events. Copy bandwidth: PyTorch device-to-device copy of 1 GiB, (read + write) / time. Each
kernel cell of the table: time, speed-up vs torch, bandwidth share and roofline speed-up (the
cell's codes + scales + x + y bytes moved at copy bandwidth; `format_cell`).

Usage: PYTHONPATH=. python benchmarks/kernel_bench.py [--mode explore|full] [--budget-s 420]
  [--paths default,wide,nk] (kernel configs timed per (p, bits) and M: `default_config`,
                            `wide_config` (path="wide") and/or `nk_config` (path="nk", weights
                            converted once with `to_nk16`; p = 1 2/4-bit grids only); columns
                            p{p}_b{bits}[_wide|_nk]_us)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.higgs_matmul import (
    KernelPackedWeight,
    default_config,
    higgs_matmul_pallas,
    higgs_matmul_reference,
)
from pallas_kernels.higgs_matmul import wrapper as _wrapper
from pallas_kernels.higgs_matmul.autotune import time_device, time_host_call
from pallas_kernels.higgs_matmul.config import nk_config, wide_config
from pallas_kernels.higgs_matmul.reference import decode_rotated
from pallas_kernels.higgs_matmul.repack import SUPPORTED, kernel_grid_values, to_nk16

SHAPES = [(4096, 14336), (14336, 4096), (8192, 28672), (4096, 4096), (4096, 1024)]
MS = [1, 4, 16, 64]
# (p, n); bits = log2(n)/p
GRIDS = [(1, 4), (1, 8), (1, 16), (2, 16), (2, 64), (2, 256), (4, 256), (4, 4096)]
H = 512  # Hadamard block (HF default); one bf16 scale per block (g = h)
L2_DEFEAT_BYTES = 150e6


def lloyd_1d(n: int, iters: int = 300) -> np.ndarray:
    """Lloyd-Max levels of N(0,1) (for timing only; the project's grids live in higgs_jax.grids)."""
    from math import erf, exp, pi, sqrt

    pdf = lambda t: exp(-t * t / 2) / sqrt(2 * pi)
    cdf = lambda t: 0.5 * (1 + erf(t / sqrt(2)))
    c = np.linspace(-2, 2, n)
    for _ in range(iters):
        b = [-np.inf] + list((c[1:] + c[:-1]) / 2) + [np.inf]
        c = np.array(
            [
                (pdf(b[i]) - pdf(b[i + 1])) / max(cdf(b[i + 1]) - cdf(b[i]), 1e-300)
                if np.isfinite(b[i]) or np.isfinite(b[i + 1])
                else 0.0
                for i in range(n)
            ]
        )
    return c


def grid_values(p: int, n: int) -> tuple:
    """The grid in the order the kernel layout stores it (p = 1, 16 points: sign/magnitude,
    `repack.kernel_grid_values`; random codes are valid in either order)."""
    if p == 1:
        return kernel_grid_values(1, tuple((float(v),) for v in lloyd_1d(n)))
    rng = np.random.default_rng(n)
    return tuple(tuple(float(v) for v in row) for row in rng.normal(size=(n, p)))


def grid_name(p: int, n: int) -> str:
    """ "p1_4b"-style name of a (p, n) grid (bits per weight = log2(n) / p)."""
    return f"p{p}_{int(math.log2(n)) // p}b"


def random_weight(key, k: int, n_cols: int, p: int, n: int) -> KernelPackedWeight:
    """Random codes straight in the kernel layout (any bit pattern is a valid code)."""
    cb = SUPPORTED[(p, n)]
    k_pad = -(-k // H) * H
    units = -(-(k_pad // p) // 32)
    k1, k2 = jax.random.split(key)
    words = jax.random.bits(k1, (units, cb, n_cols), jnp.uint32)
    scales = jax.random.uniform(k2, (k_pad // H, n_cols), jnp.float32, 0.5, 1.5).astype(
        jnp.bfloat16
    )
    return KernelPackedWeight(
        words=words,
        scales=scales,
        signs=None,
        shape=(k, n_cols),
        dtype="bfloat16",
        p=p,
        n=n,
        grid_values=grid_values(p, n),
        hadamard_size=H,
        group_size=H,
        k_pad=k_pad,
    )


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x14336"`` -> (4096, 14336); ValueError naming ``text`` otherwise."""
    try:
        k, n = (int(v) for v in text.split("x"))
    except ValueError:
        raise ValueError(f"shapes must look like 4096x4096, got {text!r}") from None
    return k, n


def check_sweep_args(ap, m: int, reps: int, shape_texts) -> list[tuple[int, int]]:
    """Shared checks of the M=1 sweep scripts (tile_sweep, route_bench): ``ap.error`` naming a bad
    --m, --reps or --shapes entry; returns the parsed shapes."""
    if not 1 <= m <= 256:
        ap.error(f"--m must be in 1..256 (the kernel's row range), got {m}")
    if reps < 1:
        ap.error(f"--reps must be >= 1, got {reps}")
    shapes = []
    for s in shape_texts:
        try:
            shapes.append(parse_shape(s))
        except ValueError as e:
            ap.error(f"--shapes entries: {e}")
    return shapes


def n_copies(nbytes: int) -> int:
    return int(min(8, max(2, math.ceil(L2_DEFEAT_BYTES / max(nbytes, 1)))))


def copy_bandwidth_torch() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (s.elapsed_time(e) / 1e3)


def torch_matmul_time(m: int, k: int, n: int, reps: int = 100) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    copies = n_copies(k * n * 2)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    outs = [None] * copies
    for i in range(copies):
        outs[i] = x @ ws[i]
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    inner = max(1, reps // copies)
    with torch.cuda.graph(g):
        for _ in range(inner):
            for i in range(copies):
                outs[i] = x @ ws[i]
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    g.replay()
    e.record()
    torch.cuda.synchronize()
    t = s.elapsed_time(e) / 1e3 / (inner * copies)
    del ws, outs, g
    torch.cuda.empty_cache()
    return t


def weight_bytes(kw: KernelPackedWeight) -> int:
    return kw.words.size * kw.words.dtype.itemsize + kw.scales.size * kw.scales.dtype.itemsize


PATH_CONFIGS = {
    "default": lambda m, k, n, p, bits, n_grid: default_config(m, k, n, p, bits),
    "wide": lambda m, k, n, p, bits, n_grid: wide_config(m, k, n, p, bits),
    "nk": lambda m, k, n, p, bits, n_grid: nk_config(m, k, n, code_bits=SUPPORTED[(p, n_grid)]),
}
#: Grids (p, n) the "nk" path (weights converted once with `to_nk16`) takes: p = 1, 2/4 bits.
NK_GRIDS = ((1, 4), (1, 16))


def path_config(path: str, m: int, k: int, n_cols: int, p: int, n_grid: int):
    """The config a --paths entry times: `default_config`, `wide_config` or `nk_config`.

    "default" is the config `higgs_matmul` picks for such a weight: `default_config` with the
    grid's real bits per weight. (Until session 14 this script passed bits = 0, which turned off
    the code-width rules: 8 warps for 4-bit codes at M = 1, more split-K for 2-bit codes. Its
    "default" column timed a slower config than the wrapper runs: at M = 1, 8192x28672, 72 vs
    63 us at 4 bits, 58 vs 52 us at 2 bits on an H100.) `nk_config` takes the code width from
    ``n_grid``.
    """
    return PATH_CONFIGS[path](m, k, n_cols, p, SUPPORTED[(p, n_grid)] / p, n_grid)


def layout_for(kw: KernelPackedWeight, cfg) -> KernelPackedWeight:
    """The weight in the layout ``cfg`` reads: nk16 for the "nk" path (one-time conversion)."""
    return jax.jit(to_nk16)(kw) if cfg.path == "nk" else kw


def path_tag(p: int, n: int, path: str) -> str:
    """Column tag of a (grid, --paths entry): p2_b4 (default) or p2_b4_wide."""
    return f"p{p}_b{int(math.log2(n)) // p}" + ("" if path == "default" else f"_{path}")


def correctness(cases, interpret: bool) -> list[dict]:
    out = []
    for case in cases:
        (p, n), m, decode = case[:3]
        path = case[3] if len(case) > 3 else "default"
        kw = random_weight(jax.random.key(p * 1000 + n + m), 1536, 384, p, n)
        x = jax.random.normal(jax.random.key(m), (m, 1536), jnp.bfloat16)
        cfg = dataclasses.replace(path_config(path, m, 1536, 384, p, n), decode=decode)
        kw = layout_for(kw, cfg)
        y = higgs_matmul_pallas(x, kw, config=cfg, interpret=interpret)
        r = higgs_matmul_reference(x.astype(jnp.float32), kw)
        err = float(jnp.linalg.norm(y.astype(jnp.float32) - r) / jnp.linalg.norm(r))
        out.append(
            {
                "p": p,
                "n": n,
                "m": m,
                "decode": decode,
                "path": cfg.path,
                "rel_err": err,
                "ok": err < 2e-2,
            }
        )
        print(
            f"check p={p} n={n:3d} M={m:3d} {cfg.path:4s} {decode:11s} rel_err={err:.2e}"
            f" {'OK' if err < 2e-2 else 'FAIL'}",
            flush=True,
        )
    return out


def kernel_only_fn(kw_cfg):
    """(kernel operand, weight) -> y: the Pallas kernel and the split-K sum, no rotation."""
    cfg, m, xblk = kw_cfg

    def f(xk, kw):
        return _wrapper.launch_kernel(xk, xblk, kw, cfg, m, jnp.bfloat16, False)

    return f


def bench_entry(k, n_cols, m, p, n, cfg, reps, key, with_kernel_only=True):
    kw0 = layout_for(random_weight(key, k, n_cols, p, n), cfg)
    copies = n_copies(weight_bytes(kw0))
    kws = [kw0] + [
        layout_for(random_weight(jax.random.fold_in(key, i), k, n_cols, p, n), cfg)
        for i in range(1, copies)
    ]
    x = jax.random.normal(jax.random.fold_in(key, 99), (m, k), jnp.bfloat16)
    t_full = time_device(lambda a, w: higgs_matmul_pallas(a, w, config=cfg), x, kws, reps)
    res = {"t_full": t_full, "copies": copies, "weight_bytes": weight_bytes(kw0)}
    if with_kernel_only:
        xk, xblk = _wrapper.prepare_activations(x, kw0, cfg, m, jnp.bfloat16)
        res["t_kernel"] = time_device(kernel_only_fn((cfg, m, xblk)), xk, kws, reps)
    return res


def main(argv=None) -> int:
    saved = list(GRIDS)
    try:
        return _main(argv)
    finally:
        GRIDS[:] = saved  # --grids narrows the module's grid list for one run only


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["explore", "full", "all", "smoke"], default="all")
    ap.add_argument("--explore-s", type=float, default=200)
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--results-dir", default="benchmarks/results")
    ap.add_argument("--tag", default="kernels")
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... subset of the table's shapes")
    ap.add_argument("--ms", default=None, help="M values, e.g. 1,4,16,64")
    ap.add_argument("--max-checks", type=int, default=None, help="cap the correctness cases")
    ap.add_argument(
        "--grids",
        default=None,
        help="comma list of grids to run, e.g. p1_2b,p1_4b (default: all of "
        + ",".join(grid_name(p, n) for p, n in GRIDS)
        + ")",
    )
    ap.add_argument(
        "--paths",
        default="default",
        help="comma list of kernel configs to time per (p, bits) and M: default (default_config)"
        ", wide (wide_config, path='wide'), nk (nk_config on to_nk16 weights; p = 1, 2/4 bits)",
    )
    args = ap.parse_args(argv)
    if args.grids is not None:
        names = {grid_name(p, n): (p, n) for p, n in GRIDS}
        chosen = [t.strip() for t in args.grids.split(",") if t.strip()]
        unknown = [t for t in chosen if t not in names]
        if unknown or not chosen:
            ap.error(
                f"--grids: unknown entries {unknown} in {args.grids!r}; choose from {list(names)}"
            )
        GRIDS[:] = [names[t] for t in chosen]  # every table and loop below reads GRIDS
    paths = [t.strip() for t in args.paths.split(",") if t.strip()]
    bad = [t for t in paths if t not in PATH_CONFIGS]
    if bad or not paths:
        ap.error(
            f"--paths: unknown entries {bad} in {args.paths!r}; choose from {list(PATH_CONFIGS)}"
        )
    t_start = time.time()
    out_dir = Path(os.environ.get("OUT") or args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(getattr(dev, "device_kind", dev.platform)),
        "jax": jax.__version__,
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "mode": args.mode,
    }
    print(meta, flush=True)
    results = {"meta": meta, "checks": [], "rows": []}
    out_json = out_dir / f"{args.tag}_{args.mode}.json"

    def save():
        out_json.write_text(json.dumps(results, indent=1))

    def left() -> float:
        return args.budget_s - (time.time() - t_start)

    # 1. correctness on this device, every decoder
    cases = [((p, n), m, d) for (p, n) in GRIDS for m in (1, 16) for d in ("auto",)]
    cases += [((1, n), 1, d) for n in (4, 8, 16) for d in ("poly", "select", "gather")]
    cases += [((2, n), 1, d) for n in (16, 64, 256) for d in ("gather", "gather_pair")]
    cases += [((2, 16), 1, "select")]
    if args.mode == "smoke":
        cases = cases[:3]
    elif args.mode == "all":
        cases = cases[:12]
    if args.max_checks is not None:
        cases = cases[: args.max_checks]
    if "nk" in paths:
        # nk path (to_nk16 weights): both grids it takes at M = 16 ("xw") and M = 64 ("wx")
        cases += [(g, m, "auto", "nk") for g in NK_GRIDS for m in (16, 64) if g in GRIDS]
    if "wide" in paths:
        # wide path: every grid at M = 16 (one M block), two at M = 1 / 64, one p=1 pair decode
        wide = [((p, n), 16, "auto", "wide") for (p, n) in GRIDS]
        wide += [((1, 16), 1, "auto", "wide"), ((2, 256), 64, "auto", "wide")]
        wide += [((1, 16), 16, "gather", "wide")]
        cases += wide[:3] if args.mode == "smoke" else wide
    results["checks"] = correctness(cases, interpret=not on_gpu)
    save()
    if not on_gpu:
        print("no GPU: correctness only")
        return 0

    bw = copy_bandwidth_torch()
    results["meta"]["copy_bw"] = bw
    print(
        f"copy bandwidth (torch, read+write): {bw / 1e12:.2f} TB/s" if bw else "no torch",
        flush=True,
    )

    rows = results["rows"]

    def add(row):
        rows.append(row)
        save()
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )

    key = jax.random.key(0)
    # loop floor: the same fori_loop around a trivial op (launch + dependency cost per call)
    xf = jax.random.normal(key, (1, 4096), jnp.bfloat16)
    results["meta"]["loop_floor_us"] = (
        time_device(lambda a, w: a[:, :8] * w, xf, [jnp.bfloat16(2)], 256) * 1e6
    )
    print(f"loop floor {results['meta']['loop_floor_us']:.2f} us", flush=True)
    best_decode: dict[tuple[int, int], str] = {}
    if args.mode in ("explore", "all"):
        # decoder sweep at M = 1 on the two largest 8B shapes; the fastest (summed) is used below
        t_explore_end = time.time() + args.explore_s
        sums: dict[tuple[int, int, str], float] = {}
        for k, n_cols in [(4096, 14336), (8192, 28672)]:
            for p, n in GRIDS:
                decs = (
                    ["poly", "select", "gather"]
                    if p == 1
                    else ["gather", "gather_pair"] + (["select"] if n == 16 else [])
                )
                base = default_config(1, k, n_cols, p, SUPPORTED[(p, n)] / p)
                for d in decs:
                    cfg = dataclasses.replace(base, decode=d)
                    if time.time() > t_explore_end:
                        break
                    try:
                        r = bench_entry(
                            k, n_cols, 1, p, n, cfg, args.reps, key, with_kernel_only=False
                        )
                        sums[(p, n, d)] = sums.get((p, n, d), 0.0) + r["t_full"]
                        add(
                            {
                                "K": k,
                                "N": n_cols,
                                "M": 1,
                                "p": p,
                                "n": n,
                                "decode": d,
                                "split": cfg.split_k,
                                "bn": cfg.block_n,
                                "bk": cfg.block_k,
                                "us": r["t_full"] * 1e6,
                                "weight_gbs": r["weight_bytes"] / r["t_full"] / 1e9,
                            }
                        )
                    except Exception as e:  # noqa: BLE001
                        add(
                            {
                                "K": k,
                                "N": n_cols,
                                "p": p,
                                "n": n,
                                "decode": d,
                                "error": repr(e)[:200],
                            }
                        )
        for p, n in GRIDS:
            cands = {d: t for (pp, nn, d), t in sums.items() if (pp, nn) == (p, n)}
            if cands:
                best_decode[(p, n)] = min(cands, key=cands.get)
        results["meta"]["best_decode_m1"] = {f"p{p}_n{n}": d for (p, n), d in best_decode.items()}
        print("best decoders at M=1:", results["meta"]["best_decode_m1"], flush=True)
        save()
        if args.mode == "explore":
            return 0

    # full table
    table = []
    shapes = (
        [tuple(int(t) for t in sh.split("x")) for sh in args.shapes.split(",")]
        if args.shapes
        else SHAPES
    )
    ms = [int(t) for t in args.ms.split(",")] if args.ms else MS
    for k, n_cols in shapes:
        for m in ms:
            if left() < 30:
                print("budget exhausted; stopping")
                break
            entry = {"K": k, "N": n_cols, "M": m}
            entry["torch_us"] = (torch_matmul_time(m, k, n_cols, args.reps) or float("nan")) * 1e6
            wb = [
                jax.random.normal(jax.random.fold_in(key, i), (k, n_cols), jnp.bfloat16)
                for i in range(n_copies(k * n_cols * 2))
            ]
            x = jax.random.normal(key, (m, k), jnp.bfloat16)
            entry["jnp_dot_us"] = time_device(lambda a, w: jnp.dot(a, w), x, wb, args.reps) * 1e6
            del wb
            kw4 = random_weight(key, k, n_cols, 2, 256)

            def deq_dot(a, w):
                xr = _wrapper.rotate_activations(a, w).astype(jnp.bfloat16)
                return jnp.dot(xr, decode_rotated(w).astype(jnp.bfloat16))

            entry["xla_deq_dot_4b_us"] = (
                time_device(deq_dot, x, [kw4], max(4, args.reps // 8)) * 1e6
            )
            for (p, n), path in [(g, path) for g in GRIDS for path in paths]:
                if path == "nk" and (p, n) not in NK_GRIDS:
                    continue  # the nk16 layout holds p = 1 codes of 2 or 4 bits only
                cfg = path_config(path, m, k, n_cols, p, n)
                if (p, n) in best_decode and path == "default":
                    # M=1 decoder sweep of the default kernels; the wide path keeps "auto"
                    cfg = dataclasses.replace(cfg, decode=best_decode[(p, n)])
                tag = path_tag(p, n, path)
                try:
                    r = bench_entry(
                        k,
                        n_cols,
                        m,
                        p,
                        n,
                        cfg,
                        args.reps,
                        jax.random.fold_in(key, p * n),
                        with_kernel_only=(m == 1),
                    )
                    entry[f"{tag}_us"] = r["t_full"] * 1e6
                    if "t_kernel" in r:
                        entry[f"{tag}_kernel_us"] = r["t_kernel"] * 1e6
                    bytes_moved = r["weight_bytes"] + m * k * 2 + m * n_cols * 2
                    entry[f"{tag}_bw_frac"] = bytes_moved / r["t_full"] / bw if bw else float("nan")
                except Exception as e:  # noqa: BLE001
                    entry[f"{tag}_error"] = repr(e)[:300]
                    traceback.print_exc()
            add(entry)
            table.append(entry)
    # host dispatch overhead, one representative call
    kw = random_weight(key, 4096, 4096, 1, 16)
    x = jax.random.normal(key, (1, 4096), jnp.bfloat16)
    host = time_host_call(lambda a, w: higgs_matmul_pallas(a, w), x, kw)
    dev_t = time_device(lambda a, w: higgs_matmul_pallas(a, w), x, [kw], args.reps)
    results["meta"]["host_call_us"] = host * 1e6
    results["meta"]["device_us_same_call"] = dev_t * 1e6
    save()

    lines = [
        f"# HIGGS Pallas kernel benchmark ({meta['date']}, {meta['device']}, jax {meta['jax']})",
        (
            f"command: `{meta['command']}`; copy bandwidth {bw / 1e12:.2f} TB/s (torch, read+write); "
            f"host dispatch of one jitted call (4096x4096, M=1): {host * 1e6:.0f} us wall vs "
            f"{dev_t * 1e6:.1f} us device"
        ),
        "",
        (
            "times in us (device); xN = speed-up vs torch bf16; bw = (codes+scales+x+y bytes)/time"
            " / copy BW; roof = the speed-up over torch if those bytes moved at copy BW (roofline)"
        ),
        "",
        "| K x N | M | torch | jnp.dot | deq+dot 4b | "
        + " | ".join(
            f"p{p} {int(math.log2(n)) // p}b" + ("" if path == "default" else f" {path}")
            for p, n in GRIDS
            for path in paths
        )
        + " |",
        "|---|---|---|---|---|" + "---|" * (len(GRIDS) * len(paths)),
    ]
    lines.insert(
        2,
        f"loop floor (trivial op in the same timing loop): {results['meta']['loop_floor_us']:.1f} us; "
        f"decoders: {results['meta'].get('best_decode_m1', 'auto')}",
    )
    for e in table:
        cells = []
        for (p, n), path in [(g, path) for g in GRIDS for path in paths]:
            tag = path_tag(p, n, path)
            if f"{tag}_us" in e:
                cells.append(format_cell(e, tag))
            elif path == "nk" and (p, n) not in NK_GRIDS:
                cells.append("n/a")
            else:
                cells.append("err")
        lines.append(
            f"| {e['K']}x{e['N']} | {e['M']} | {e['torch_us']:.1f} | {e['jnp_dot_us']:.1f} | "
            f"{e['xla_deq_dot_4b_us']:.1f} | " + " | ".join(cells) + " |"
        )
    md = "\n".join(lines)
    (out_dir / f"{args.tag}.md").write_text(md + "\n")
    print("\n" + md)
    return 0


def roofline_speedup(torch_us: float, us: float, bw_frac: float) -> float:
    """Speed-up over torch of a kernel that moved the cell's bytes at copy bandwidth: those bytes
    take ``bw_frac * us`` at copy bandwidth (``bw_frac`` = bytes / time / copy bandwidth)."""
    return torch_us / (bw_frac * us)


def format_cell(entry: dict, tag: str) -> str:
    """One kernel cell of the table: ``us (speed-up vs torch, bw share, roof = roofline speed-up)``."""
    us, frac, torch_us = entry[f"{tag}_us"], entry[f"{tag}_bw_frac"], entry["torch_us"]
    has_torch = math.isfinite(torch_us)
    parts = [f"{torch_us / us:.2f}x" if has_torch else "no torch"]
    if math.isfinite(frac) and frac > 0:
        parts.append(f"bw {frac:.0%}")
        if has_torch:
            parts.append(f"roof {roofline_speedup(torch_us, us, frac):.1f}x")
    else:
        parts.append("bw n/a")
    return f"{us:.1f} ({', '.join(parts)})"


if __name__ == "__main__":
    raise SystemExit(main())
