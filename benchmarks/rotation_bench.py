"""Micro-benchmark: ways to produce the kernel's rotated, permuted activations (GPU, standalone).

For M rows of bf16 activations (K wide, after an RMSNorm-like producer) each variant produces the
f32 rotated activations in a permuted order the matmul kernel reads contiguously:
- fwht: `block_hadamard` (Sylvester butterflies) then the (M, p, 32, U) transpose (current);
- dot: one matmul per Hadamard block with a +-1 matrix whose columns are already permuted,
  output (M, K/h, p, 32, h/(32p)) (the "blocked" layout), scaled by 1/sqrt(h) in f32;
- reduce: the same product written as a broadcast multiply + sum (an XLA reduction fusion).
Device time: C chained applications inside one jitted fori_loop of R iterations, / (R C).
Usage: PYTHONPATH=. python benchmarks/rotation_bench.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from higgs_jax import hadamard  # noqa: E402

P, H = 2, 512


def qperm(h: int, p: int) -> np.ndarray:
    """(h, h) +-1: column (d, c, u) = Sylvester row (32u + c) p + d."""
    hm = hadamard.hadamard_matrix(h)  # +-1 entries (unnormalized)
    ub = h // (32 * p)
    d, c, u = np.meshgrid(np.arange(p), np.arange(32), np.arange(ub), indexing="ij")
    rows = ((32 * u + c) * p + d).reshape(-1)
    return np.rint(hm[rows].T).astype(np.float32)  # (h in, h out)


def producer(h, gamma):
    v = h.astype(jnp.float32)
    v = v * jax.lax.rsqrt(jnp.mean(v * v, -1, keepdims=True) + 1e-5) * gamma
    return v.astype(jnp.bfloat16)


def v_fwht(x):
    m, k = x.shape
    xr = hadamard.block_hadamard(x.astype(jnp.float32), H, axis=-1, normalize=True)
    return xr.reshape(m, k // (32 * P), 32, P).transpose(0, 3, 2, 1)


def make_dot(q):
    qb = jnp.asarray(q, jnp.bfloat16)

    def f(x):
        m, k = x.shape
        y = jnp.dot(x.reshape(m, k // H, H), qb, preferred_element_type=jnp.float32)
        return (y * np.float32(1 / np.sqrt(H))).reshape(m, k // H, P, 32, H // (32 * P))
    return f


def make_reduce(q):
    qf = jnp.asarray(q.T, jnp.bfloat16)  # (out, in)

    def f(x):
        m, k = x.shape
        xb = x.reshape(m, k // H, 1, H).astype(jnp.float32)
        y = jnp.sum(xb * qf.astype(jnp.float32)[None, None], axis=-1)
        return (y * np.float32(1 / np.sqrt(H))).reshape(m, k // H, P, 32, H // (32 * P))
    return f


def timed(fn, h0, gamma, reps=100, chain=8):
    @jax.jit
    def loop(h0, n):
        def body(_, h):
            for _ in range(chain):
                out = fn(producer(h, gamma))
                h = h + (out.reshape(h.shape[0], -1)[:, : h.shape[1]] * 0).astype(h.dtype)
            return h
        return jax.lax.fori_loop(0, n, body, h0)

    n = jnp.asarray(reps, jnp.int32)
    loop(h0, n).block_until_ready()
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        loop(h0, n).block_until_ready()
        best = min(best, (time.perf_counter() - t0) / (reps * chain) * 1e6)
    return best


def main():
    q = qperm(H, P)
    rows = []
    for m in (1, 16):
        for k in (4096, 14336):
            key = jax.random.key(0)
            h0 = jax.random.normal(key, (m, k), jnp.bfloat16)
            gamma = jnp.ones((k,), jnp.float32)
            x = producer(h0, gamma)
            ref = v_fwht(x)  # (M, p, 32, U)
            u = k // (32 * P)
            ub = H // (32 * P)
            for name, fn in (("fwht", v_fwht), ("dot", make_dot(q)), ("reduce", make_reduce(q))):
                out = jax.jit(fn)(x)
                if name != "fwht":  # blocked (M, nb, p, 32, ub) -> (M, p, 32, U)
                    out = out.transpose(0, 2, 3, 1, 4).reshape(m, P, 32, u)
                err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
                us = timed(fn, h0, gamma)
                rows.append((m, k, name, us, err))
                print(f"M={m} K={k} {name}: {us:.2f} us/application, max rel err {err:.1e}", flush=True)
    base = timed(lambda x: x.astype(jnp.float32), h0, gamma)
    print(f"producer-only floor (M=16, K=14336): {base:.2f} us")
    print("| M | K | variant | us | err |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.1e} |")


if __name__ == "__main__":
    main()
