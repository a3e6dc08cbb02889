"""Tiling sweep of the M=1 HIGGS kernel on the decode shapes of a fused Llama-3.1-8B layer (GPU).

For each (K, N) shape and grid, times the full op (`higgs_matmul_pallas`: rotation + kernel +
split-K sum) for the heuristic `default_config` and a grid of alternatives (block_n, units per
step, split-K, num_warps), each checked once against the f32 reference, and reports the fastest.
Device time as in kernel_bench.py: `autotune.time_device` (>= 32 calls per fori_loop iteration,
cycling through enough weight copies to defeat the 50 MB L2). Results are written after every
candidate (a time limit keeps what was measured).

Usage (GPU): PYTHONPATH=. python benchmarks/tile_sweep.py --out $OUT [--budget-s 500] [--knobs]
             [--decoders auto regtab] (decoders x tilings x fused FMA)
             [--m 16 --variants "num_stages=2" "tile_scale=false,block_n=64"] (overrides of the
             default config, each timed after the default)
CPU smoke:   PYTHONPATH=. python benchmarks/tile_sweep.py --out /tmp/ts --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_bench import (  # noqa: E402
    check_sweep_args,
    n_copies,
    random_weight,
    weight_bytes,
)
from pallas_kernels.higgs_matmul import default_config, higgs_matmul_pallas  # noqa: E402
from pallas_kernels.higgs_matmul.autotune import time_device  # noqa: E402
from pallas_kernels.higgs_matmul.config import (  # noqa: E402
    DECODES,
    TARGET_PROGRAMS,
    nk_config,
    split_k_for,
)
from pallas_kernels.higgs_matmul.reference import higgs_matmul_reference  # noqa: E402
from pallas_kernels.higgs_matmul.repack import SUPPORTED, to_nk16  # noqa: E402

#: The four linears of a fused 8B decoder layer: qkv, o, gate_up, down.
SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))
GRIDS = {
    "p1_4b": (1, 16),
    "p1_3b": (1, 8),
    "p1_2b": (1, 4),
    "p2_4b": (2, 256),
    "p2_3b": (2, 64),
    "p2_2b": (2, 16),
    "p4_3b": (4, 4096),
    "p4_2b": (4, 256),
}


def candidates(m: int, k: int, n: int, p: int, n_grid: int, full: bool) -> list:
    cb = SUPPORTED[(p, n_grid)]
    base = default_config(m, k, n, p, cb / p)
    units = -(-(-(-k // p)) // 32)
    out = [base]
    for bn in (32, 64, 128):
        for bku in (4, 8, 16) if full else (8, 16):
            steps_total = -(-units // bku)
            s0 = split_k_for(steps_total, -(-n // bn))
            for split in (s0, 2 * s0, 4 * s0):
                if split > steps_total:
                    continue
                for warps in (2, 4) if full else (4,):
                    out.append(
                        dataclasses.replace(
                            base, block_n=bn, block_k=bku * 32 * p, split_k=split, num_warps=warps
                        )
                    )
    return list(dict.fromkeys(out))  # Config is frozen (hashable); keeps the first of each


def knob_candidates(
    m: int, k: int, n: int, p: int, n_grid: int, warps=None, fused=(False, True)
) -> list:
    """The default tiling and the one with half the units per step, each with every word-load
    mode (lazy / eager / prefetch) x separate or fused multiply-adds (`Config.words`,
    `Config.fused_fma`; ``fused``) x ``warps`` (default: the default config's); split-K
    re-derived for the halved tiling."""
    cb = SUPPORTED[(p, n_grid)]
    base = default_config(m, k, n, p, cb / p)
    units = -(-(-(-k // p)) // 32)
    bku0 = base.block_k // (32 * p)
    tilings = [base]
    if bku0 >= 2:
        bku = bku0 // 2
        split = split_k_for(-(-units // bku), -(-n // base.block_n))
        tilings.append(dataclasses.replace(base, block_k=bku * 32 * p, split_k=split))
    out = [base]
    for t in tilings:
        for words in ("lazy", "eager", "prefetch"):
            for f in fused if base.path == "fma" else (False,):
                for nw in warps or (base.num_warps,):
                    out.append(dataclasses.replace(t, words=words, fused_fma=f, num_warps=nw))
    return list(dict.fromkeys(out))


def decoder_candidates(
    m: int, k: int, n: int, p: int, n_grid: int, decoders, warps=(4,), fused=(False, True)
) -> list:
    """The default config, then each decoder at 4, 8 and 16 units per step (dot path: 16 and
    32; split-K re-derived
    as `default_config` does, 2-bit codes with twice the program target) x separate or fused
    multiply-adds (``fused``; fma path only, the dot path has no such option) x ``warps``."""
    cb = SUPPORTED[(p, n_grid)]
    base = default_config(m, k, n, p, cb / p)
    units = -(-(-(-k // p)) // 32)
    target = TARGET_PROGRAMS * (2 if cb == 2 else 1)
    out = [base]
    for decode in decoders:
        for bku in (4, 8, 16) if base.path == "fma" else (16, 32):  # dot: K = BKU >= 16
            steps_total = -(-units // bku)
            split = split_k_for(steps_total, -(-n // base.block_n), target)
            for f in fused if base.path == "fma" else (False,):
                for nw in warps:
                    out.append(
                        dataclasses.replace(
                            base,
                            block_k=bku * 32 * p,
                            split_k=split,
                            decode=decode,
                            fused_fma=f,
                            num_warps=nw,
                        )
                    )
    return list(dict.fromkeys(out))


def parse_variant(text: str) -> dict:
    """``"path=dot,num_warps=8"`` -> Config overrides (ints, true/false, strings); "default" or
    "" -> no overrides. Also ``as_m=16``: start from M = 16's default config (`variant_candidates`).
    Unknown field names and a non-positive ``as_m`` raise ValueError naming them."""
    from pallas_kernels.higgs_matmul import Config

    fields = set(Config.__dataclass_fields__) | {"as_m"}
    out: dict = {}
    if text in ("", "default"):
        return out
    for item in text.split(","):
        name, sep, val = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(
                f"variant item {item!r}: expected FIELD=VALUE with FIELD in {sorted(fields)}"
            )
        if val.lower() in ("true", "false"):
            out[name] = val.lower() == "true"
        elif val.lstrip("-").isdigit():
            out[name] = int(val)
        else:
            out[name] = val
    if "as_m" in out and (isinstance(out["as_m"], bool) or not isinstance(out["as_m"], int)
                          or out["as_m"] < 1):
        raise ValueError(f"as_m must be a positive int, got {out['as_m']!r}")
    return out


def variant_candidates(m: int, k: int, n: int, p: int, n_grid: int, variants) -> list:
    """The default config, then the default with each variant's overrides (`parse_variant`)."""
    base = default_config(m, k, n, p, SUPPORTED[(p, n_grid)] / p)
    out = [base]
    for v in variants:
        over = parse_variant(v)
        # "path=nk": the nk16 layout's own default (`nk_config`), then the other overrides;
        # "as_m=16": the default config of another M (e.g. the dot path's at M = 4)
        as_m = over.pop("as_m", None)
        if over.get("path") == "nk":
            start = nk_config(m, k, n, code_bits=SUPPORTED[(p, n_grid)])
        elif as_m is not None:
            start = default_config(as_m, k, n, p, SUPPORTED[(p, n_grid)] / p)
        else:
            start = base
        out.append(dataclasses.replace(start, **over))
    return list(dict.fromkeys(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--grids", nargs="+", default=["p2_4b"], choices=sorted(GRIDS))
    ap.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="also BKU=4 and num_warps=2")
    ap.add_argument(
        "--knobs",
        action="store_true",
        help="sweep word-load modes x fused FMA on two tilings instead of the tiling grid",
    )
    ap.add_argument(
        "--decoders",
        nargs="+",
        default=None,
        help="sweep these Config.decode values (x 3 tilings x fused FMA) instead of the tiling grid",
    )
    ap.add_argument(
        "--warps", nargs="+", type=int, default=[4], help="--decoders/--knobs: num_warps to try"
    )
    ap.add_argument(
        "--fused-only", action="store_true", help="--decoders/--knobs: fused FMAs only (fma path)"
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help='time these overrides of the default config instead of the tiling grid, e.g. '
        '"path=dot,block_k=512" "num_warps=8"',
    )
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, interpret mode (CPU)")
    args = ap.parse_args(argv)
    shapes = check_sweep_args(ap, args.m, args.reps, args.shapes)
    bad = [d for d in args.decoders or () if d not in DECODES]
    if bad:
        ap.error(f"--decoders: unknown {bad}; choose from {list(DECODES)}")
    if any(w not in (1, 2, 4, 8, 16) for w in args.warps):
        ap.error(f"--warps: each value must be a power of two up to 16, got {args.warps}")
    from pallas_kernels.higgs_matmul import Config

    for v in args.variants or ():
        try:
            over = parse_variant(v)
            over.pop("as_m", None)
            dataclasses.replace(Config(), **over)  # names a bad value too
        except ValueError as e:
            ap.error(f"--variants {v!r}: {e}")
    if args.smoke:
        shapes = [(512, 256)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows: list[dict] = []
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": str(getattr(jax.devices()[0], "device_kind", jax.devices()[0].platform)),
        "jax": jax.__version__,
        "command": "python benchmarks/tile_sweep.py " + " ".join(argv or sys.argv[1:]),
        "m": args.m,
    }

    def save():
        (out / "tile_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    interpret = args.smoke
    for gname in args.grids:
        p, n_grid = GRIDS[gname]
        for k, n in shapes:
            key = jax.random.key(k * 7 + n)
            kw0 = random_weight(key, k, n, p, n_grid)
            copies = 1 if args.smoke else n_copies(weight_bytes(kw0))
            kws = [kw0] + [
                random_weight(jax.random.fold_in(key, i), k, n, p, n_grid) for i in range(1, copies)
            ]
            x = jax.random.normal(jax.random.fold_in(key, 99), (args.m, k), jnp.bfloat16)
            ref = np.asarray(higgs_matmul_reference(x.astype(jnp.float32), kw0), np.float64)
            if args.variants:
                cands = variant_candidates(args.m, k, n, p, n_grid, args.variants)
            elif args.decoders:
                cands = decoder_candidates(
                    args.m,
                    k,
                    n,
                    p,
                    n_grid,
                    args.decoders,
                    warps=tuple(args.warps),
                    fused=(True,) if args.fused_only else (False, True),
                )
            elif args.knobs:
                cands = knob_candidates(
                    args.m,
                    k,
                    n,
                    p,
                    n_grid,
                    warps=tuple(args.warps),
                    fused=(True,) if args.fused_only else (False, True),
                )
            else:
                cands = candidates(args.m, k, n, p, n_grid, args.full)
            nk_weights: list = []  # the nk16 copies (`repack.to_nk16`), made once if needed
            for i, cfg in enumerate(cands):
                ws = kws
                if cfg.path == "nk":
                    if not nk_weights:
                        nk_weights.extend(jax.jit(to_nk16)(w) for w in kws)
                    ws = nk_weights
                if time.perf_counter() - t_start > args.budget_s:
                    print("budget exhausted", flush=True)
                    break
                row = {"grid": gname, "k": k, "n": n, "default": i == 0, **cfg.to_dict()}
                try:
                    y = higgs_matmul_pallas(x, ws[0], config=cfg, interpret=interpret)
                    y = np.asarray(y, np.float64)
                    row["rel_err"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    if row["rel_err"] > 2e-2:
                        raise AssertionError(f"rel err {row['rel_err']:.2e} vs the reference")
                    if not args.smoke:
                        fn = lambda a, w, c=cfg: higgs_matmul_pallas(a, w, config=c)  # noqa: E731
                        row["us"] = time_device(fn, x, ws, args.reps) * 1e6
                except Exception as e:  # noqa: BLE001 - a failing candidate is reported
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                save()
                print(
                    f"{gname} {k}x{n} bn={cfg.block_n} bku={cfg.block_k // (32 * p)} "
                    f"split={cfg.split_k} warps={cfg.num_warps} words={cfg.words} "
                    f"fused={int(cfg.fused_fma)} decode={cfg.decode} path={cfg.path} "
                    f"bm={cfg.block_m} stages={cfg.num_stages} ts={int(cfg.tile_scale)} "
                    f"ls={cfg.loop_stages} order={cfg.dot_order} mm={cfg.mma_m} pf={cfg.prefetch}"
                    f"{' (default)' if i == 0 else ''}: "
                    + (
                        f"{row['us']:.1f} us" if "us" in row else row.get("error", "ok (no timing)")
                    ),
                    flush=True,
                )
    from pallas_kernels.higgs_matmul import Config

    config_fields = [f.name for f in dataclasses.fields(Config)]
    lines = [
        "| grid | shape | default us | best us | best vs default config | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for gname in args.grids:
        for k, n in shapes:
            rs = [
                r for r in rows if r["grid"] == gname and r["k"] == k and r["n"] == n and "us" in r
            ]
            d = [r for r in rs if r["default"]]
            if not rs or not d:
                continue
            b = min(rs, key=lambda r: r["us"])
            # Config fields where the best candidate differs from the default (all fields of
            # `Config` are in each row).
            diff = [f"{f}={b[f]}" for f in config_fields if f in b and b[f] != d[0].get(f)]
            lines.append(
                f"| {gname} | {k}x{n} | {d[0]['us']:.1f} | {b['us']:.1f} | "
                f"{' '.join(diff) or '(the default)'} | {d[0]['us'] / b['us']:.2f}x |"
            )
    text = "\n".join(lines)
    (out / "tile_sweep.md").write_text(
        f"# M={args.m} tiling sweep ({meta['date']}, {meta['device']})\n\n{text}\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
