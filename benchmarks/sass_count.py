"""Instruction counts of the Pallas HIGGS kernel's main loop, without a GPU.

Step 1 (this process, any jax with Pallas): lower one `higgs_matmul_pallas` call for the "cuda"
platform on a CPU-only jaxlib and keep the kernel's Triton IR as text (`capture_ttir`).
Step 2 (a Python with the `triton` wheel, e.g. ``python -m venv /tmp/tv && /tmp/tv/bin/pip
install triton==3.6.0``; ptxas and nvdisasm ship in the wheel): compile that IR for sm_90 down to
SASS and count the instructions of the largest loop by opcode, per weight and per pipe class.

XLA's own Triton pipeline on the GPU may schedule slightly differently; the loop bodies matched
the profiler's instruction totals to within a few percent (docs/KERNELS.md, session 7).

Usage:
  python benchmarks/sass_count.py --grid p1_4b --shape 8192x28672 --m 1 \\
      --triton-python /tmp/tv/bin/python --out /tmp/sass
  (config overrides: --block-k 512 --block-n 128 --split-k 4 --warps 4 --stages 2)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Opcodes that issue to the integer ALU pipe on sm_90 (the byte permutes live here); IMAD
#: variants and floating-point FMAs go to the FMA pipe.
ALU_OPS = ("PRMT", "LOP3", "SHF", "IADD3", "ISETP", "SEL", "MOV", "LEA", "SGXT", "PLOP3")

_COMPILE = r"""
import json, subprocess, sys, triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps, "num_stages": stages})
base = path.rsplit(".", 1)[0]
open(base + ".ptx", "w").write(k.asm["ptx"])
open(base + ".sass", "w").write(k.asm["sass"])
open(base + ".cubin", "wb").write(k.asm["cubin"])
tool = triton.__path__[0] + "/backends/nvidia/bin/cuobjdump"
res = subprocess.run([tool, "-res-usage", base + ".cubin"], capture_output=True, text=True)
print(json.dumps({"resources": res.stdout.strip().splitlines()[-1],
                  "shared_bytes": int(getattr(k.metadata, "shared", -1))}))
"""


def capture_ttir(x, w, cfg) -> str:
    """Triton IR (text) of the kernel of ``higgs_matmul_pallas(x, w, config=cfg)``, lowered for
    "cuda" without compiling (works on a CPU-only jaxlib)."""
    import jax
    from jax._src.pallas.triton import pallas_call_registration as reg

    from pallas_kernels import _compat
    from pallas_kernels.higgs_matmul import wrapper

    _compat.install_loop_stages_hook()  # wrapped first, so the text below includes its marks
    mods: list[str] = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def hook(*a, **k):
        r = orig(*a, **k)
        mods.append(r.module.operation.get_asm(enable_debug_info=False))
        return r

    reg.lowering.lower_jaxpr_to_triton_module = hook
    try:
        fn = jax.jit(lambda x, w: wrapper._higgs_matmul(x, w, None, cfg, False))
        fn.trace(x, w).lower(lowering_platforms=("cuda",))
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    # the matmul kernel, not the activation rotation's (rotate.py), which is lowered too
    mods = [t for t in mods if "higgs_rotate" not in t]
    if not mods:
        raise RuntimeError("no Pallas Triton kernel was lowered for this call")
    return mods[-1]


def _instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    ins, labels = [], {}
    for line in sass.splitlines():
        s = line.strip()
        m = re.match(r"^(\.?L\w+):$", s)
        if m:
            labels[m.group(1)] = len(ins)
        elif "\t" in s and s.endswith(";"):
            ins.append(s.split("\t", 1)[1].rstrip(";"))
    return ins, labels


def _opcodes(ins: list[str]) -> collections.Counter:
    cnt: collections.Counter = collections.Counter()
    for t in ins:
        t = re.sub(r"^@!?U?P\w+\s+", "", t)
        cnt[t.split()[0]] += 1
    return cnt


def whole_counts(sass: str) -> collections.Counter:
    """Opcode counts of a whole nvdisasm listing."""
    return _opcodes(_instructions(sass)[0])


def loop_counts(sass: str) -> collections.Counter:
    """Opcode counts of the longest backward-branch loop of an nvdisasm listing (Triton's
    format: control codes, a tab, the instruction; labels on their own lines)."""
    ins, labels = _instructions(sass)
    best = None
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s+(\.?L\w+)", text)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            span = (labels[m.group(1)], i)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        raise ValueError(
            "no loop found in the SASS listing (ptxas unrolls short static loops: try a larger "
            "--block-k or a smaller --split-k so each program runs more steps)"
        )
    return _opcodes(ins[best[0] : best[1] + 1])


def main(argv=None) -> int:
    import jax.numpy as jnp

    from benchmarks.kernel_bench import parse_shape, random_weight
    from benchmarks.tile_sweep import GRIDS
    from pallas_kernels.higgs_matmul import default_config
    from pallas_kernels.higgs_matmul.config import nk_config
    from pallas_kernels.higgs_matmul.repack import to_nk16
    from pallas_kernels.higgs_matmul.repack import SUPPORTED

    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="p1_4b", choices=sorted(GRIDS))
    ap.add_argument("--shape", default="8192x28672")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--triton-python", default=sys.executable)
    for name in ("block-k", "block-n", "split-k", "warps", "stages", "block-m"):
        ap.add_argument(f"--{name}", type=int, default=None)
    ap.add_argument("--decode", default=None)
    ap.add_argument("--path", default=None, choices=("fma", "dot", "wide", "gemv", "nk"))
    ap.add_argument("--no-tile-scale", action="store_true", help="Config(tile_scale=False)")
    ap.add_argument("--loop-stages", type=int, default=None, help="Config.loop_stages")
    ap.add_argument("--dot-order", choices=("xw", "wx"), default=None, help="Config.dot_order")
    ap.add_argument("--mma-m", type=int, default=None, help="Config.mma_m")
    ap.add_argument("--prefetch", type=int, default=None, help="Config.prefetch")
    args = ap.parse_args(argv)
    import jax

    p, n = GRIDS[args.grid]
    try:
        k, ncols = parse_shape(args.shape)
    except ValueError as e:
        ap.error(f"--shape: {e}")
    if k <= 0 or ncols <= 0 or args.m <= 0:
        ap.error(f"--shape {args.shape!r} and --m {args.m} must be positive")
    if args.path == "nk":  # nk16 weight layout (repack.to_nk16) and its own default
        cfg = nk_config(args.m, k, ncols, code_bits=SUPPORTED[(p, n)])
    else:
        cfg = default_config(args.m, k, ncols, p, SUPPORTED[(p, n)] / p)
    over = {
        "block_k": args.block_k,
        "block_n": args.block_n,
        "split_k": args.split_k,
        "num_warps": args.warps,
        "num_stages": args.stages,
        "decode": args.decode,
        "path": args.path,
        "block_m": args.block_m,
        "tile_scale": False if args.no_tile_scale else None,
        "loop_stages": args.loop_stages,
        "dot_order": args.dot_order,
        "mma_m": args.mma_m,
        "prefetch": args.prefetch,
    }
    try:
        cfg = dataclasses.replace(cfg, **{a: v for a, v in over.items() if v is not None})
    except ValueError as e:  # Config names the bad field and value
        ap.error(f"config overrides: {e}")
    w = random_weight(jax.random.key(0), k, ncols, p, n)
    if cfg.path == "nk":
        w = jax.jit(to_nk16)(w)
    x = jnp.zeros((args.m, k), jnp.bfloat16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ttir = out / f"{args.grid}_{k}x{ncols}_m{args.m}.ttir"
    ttir.write_text(capture_ttir(x, w, cfg))
    res = subprocess.run(
        [args.triton_python, "-c", _COMPILE, str(ttir), str(cfg.num_warps), str(cfg.num_stages)],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        print(res.stderr[-3000:], file=sys.stderr)
        return res.returncode
    info = json.loads(res.stdout.strip().splitlines()[-1])
    sass = ttir.with_suffix(".sass").read_text()
    bku = cfg.block_k // (32 * p)
    try:
        cnt, per = loop_counts(sass), 1
    except ValueError:
        # ptxas unrolled the whole loop: count the kernel and spread it over its steps (the
        # per-weight figure then includes the prologue and epilogue).
        units = -(-(-(-k // p)) // 32)
        per = max(1, -(-units // (bku * cfg.split_k)))
        cnt = whole_counts(sass)
        print(f"no loop in the SASS (fully unrolled): whole kernel / {per} steps")
    threads = 32 * cfg.num_warps
    rows = cfg.block_m if cfg.path in ("dot", "wide", "nk") else 1
    weights = bku * 32 * p * cfg.block_n / threads * per  # per thread, per loop (one M block)
    total = sum(cnt.values())
    alu = sum(c for op, c in cnt.items() if op.split(".")[0] in ALU_OPS)
    print(f"{args.grid} {args.shape} M={args.m} {cfg}")
    print(info["resources"], f"dynamic shared memory {info.get('shared_bytes', -1)} bytes")
    print(
        f"loop: {total} instructions, {weights:.0f} weights/thread/step (x{rows} rows of M): "
        f"{total / weights:.3f} per weight, ALU-pipe {alu / weights:.3f} per weight"
    )
    print("  " + ", ".join(f"{op} {c}" for op, c in cnt.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
