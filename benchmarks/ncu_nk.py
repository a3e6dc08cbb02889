"""Launch the "nk" path once (after a warm-up) for Nsight Compute: one p = 1 weight in the nk16
layout, `nk_config` with optional overrides.

Usage (GPU; the Pallas kernel's launch is named higgs_matmul_p1_cb{2,4}_nk[_xw]):
  ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \\
      --section SchedulerStats -k regex:higgs_matmul \\
      python benchmarks/ncu_nk.py --bits 4 --shape 8192x28672 --m 16 [--set split_k=2 ...]
CPU smoke (interpret mode, small shape): python benchmarks/ncu_nk.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_bench import random_weight
from benchmarks.tile_sweep import parse_variant
from pallas_kernels.higgs_matmul import higgs_matmul_pallas
from pallas_kernels.higgs_matmul.config import nk_config
from pallas_kernels.higgs_matmul.repack import to_nk16


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, choices=(2, 4), default=4)
    ap.add_argument("--shape", default="8192x28672", help="KxN")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--set", nargs="*", default=[], help="Config overrides, e.g. split_k=2")
    ap.add_argument("--smoke", action="store_true", help="1024x256, interpret mode (CPU)")
    a = ap.parse_args(argv)
    k, n = (1024, 256) if a.smoke else map(int, a.shape.split("x"))
    w = jax.jit(to_nk16)(random_weight(jax.random.key(0), k, n, 1, 1 << a.bits))
    cfg = nk_config(a.m, k, n, code_bits=a.bits)
    for item in a.set:
        cfg = dataclasses.replace(cfg, **parse_variant(item))
    x = jax.random.normal(jax.random.key(1), (a.m, k), jnp.bfloat16)
    f = jax.jit(lambda x, w: higgs_matmul_pallas(x, w, config=cfg, interpret=a.smoke))
    for _ in range(2):
        y = f(x, w).block_until_ready()
    finite = bool(jnp.isfinite(y).all())
    print(f"nk {a.bits}-bit {k}x{n} M={a.m} {cfg}: y {y.shape} finite={finite}")


if __name__ == "__main__":
    main()
