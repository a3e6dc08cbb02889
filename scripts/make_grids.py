"""Computes the MSE-optimal quantization grids of the standard Gaussian N(0, I_p) shipped in
`higgs_jax/data/grids/`.

    PYTHONPATH=. python scripts/make_grids.py --out higgs_jax/data/grids

Glossary: p = grid dimension, n = number of grid points, b = log2(n)/p bits per coordinate,
MSE = per-coordinate mean squared error E|x - q(x)|^2 / p for x ~ N(0, I_p).

Method:
- p = 1: the Lloyd-Max quantizer, computed (to float64 precision) by Lloyd iterations with exact
  Gaussian integrals: the centroid of the cell (a, b) is (phi(a) - phi(b)) / (Phi(b) - Phi(a)).
  Initialised at the Panter-Dite companding points sqrt(3) * Phi^-1((i + 1/2) / n), which are
  already close to optimal, so the iteration converges quickly.
- p >= 2: Lloyd (k-means) iterations on fresh Monte-Carlo samples every iteration (a stochastic
  fixed-point iteration that cannot over-fit one sample), started from a jittered product of 1-D
  Lloyd-Max grids: first over-relaxed steps g += 1.7 (centroid - g), which speed up Lloyd's slow
  convergence, then plain Lloyd steps on 8x more samples (schedule in `schedule_for`).
  The nearest-point search uses bucketed candidate lists (see `_CandidateTable`), exact for every
  sample inside the bucket box and brute force for the few samples outside it, which makes the
  n = 4096 grids feasible on a laptop CPU.
- Every grid is then measured on >= 2^22 fresh test samples drawn with a different seed than
  training (brute-force exact nearest point), and written as float32 (n, p) `.npy` with points
  sorted lexicographically, plus `manifest.json` (measured MSE, seeds, sample counts, iterations).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtr, ndtri

# The shipped (p, n).
GRIDS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 4), (1, 8), (1, 16), (1, 32), (1, 64), (1, 256),
    (2, 4), (2, 8), (2, 16), (2, 32), (2, 64), (2, 128), (2, 256), (2, 1024), (2, 4096),
    (3, 8), (3, 64), (3, 512), (3, 4096),
    (4, 16), (4, 256), (4, 1024), (4, 4096),
)  # fmt: skip

TRAIN_SEED = 20250101
SMALL_N = 64  # p >= 2 grids with at most this many points get random restarts
RESTARTS = 8
TEST_SEED = 777
TEST_SAMPLES = 1 << 22


# ---------------------------------------------------------------------------------------------
# p = 1: exact Lloyd-Max.


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _interval_prob(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Phi(b) - Phi(a), accurate in both tails."""
    return np.where(a > 0, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))


def lloyd_max_1d(
    n: int, tol: float = 1e-13, max_iter: int = 200_000
) -> tuple[np.ndarray, float, int]:
    """Lloyd-Max levels of N(0, 1) with n levels; returns (levels, exact MSE, iterations)."""
    c = math.sqrt(3.0) * ndtri((np.arange(n) + 0.5) / n)
    it = 0
    for it in range(1, max_iter + 1):
        t = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
        a, b = t[:-1], t[1:]
        new = (_phi(a) - _phi(b)) / _interval_prob(a, b)
        new = 0.5 * (new - new[::-1])  # exact symmetry
        step = np.max(np.abs(new - c))
        c = new
        if step < tol:
            break
    t = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
    prob = _interval_prob(t[:-1], t[1:])
    # For centroid-condition quantizers, E(x - q(x))^2 = E x^2 - sum_i P_i c_i^2.
    mse = 1.0 - float(np.sum(prob * c * c))
    return c, mse, it


# ---------------------------------------------------------------------------------------------
# p >= 2: stochastic Lloyd with bucketed nearest-point search.


@functools.partial(jax.jit, static_argnames=("chunk",))
def nearest_brute(x: jax.Array, g: jax.Array, chunk: int = 128) -> jax.Array:
    """Exact nearest grid point (first index on ties) for x (B, p), B % chunk == 0."""
    n, p = g.shape
    g2 = jnp.sum(g * g, 1)
    iota = jnp.arange(n, dtype=jnp.int32)

    def one(xc):
        s = 2.0 * xc @ g.T - g2
        m = jnp.max(s, 1, keepdims=True)
        # max + masked min is ~5x faster than argmax on XLA:CPU, and identical.
        return jnp.min(jnp.where(s >= m, iota, n), 1)

    return jax.lax.map(one, x.reshape(-1, chunk, p)).reshape(-1)


@functools.partial(jax.jit, static_argnames=("m",))
def _bucket_masks(g: jax.Array, r0: float, m: int, margin: jax.Array) -> jax.Array:
    """mask[b, j]: grid point j may be nearest for some point of bucket b (or of it moved).

    Buckets are the cells of an m^p regular partition of [-r0, r0]^p, numbered in C order.
    """
    n, p = g.shape
    w = 2.0 * r0 / m
    lo = (-r0 + w * jnp.arange(m))[:, None, None]  # (m, 1, 1) per-axis cell bounds
    hi = lo + w
    gt = g.T[None]  # (1, p, n)
    # Squared distances separate over axes: per-axis terms (m, p, n), summed over bucket indices.
    near = jnp.maximum(jnp.maximum(lo - gt, gt - hi), 0.0) ** 2
    far = jnp.maximum(jnp.abs(gt - lo), jnp.abs(gt - hi)) ** 2

    def axis_sum(t):  # (m, p, n) -> (m^(p-1), n): sum over axes 1..p-1 of all index combinations
        acc = t[:, 1]
        for d in range(2, p):
            acc = (acc[:, None, :] + t[None, :, d]).reshape(-1, n)
        return acc

    near_rest, far_rest = axis_sum(near), axis_sum(far)

    def slab(i):  # buckets whose first index is i
        dmin = jnp.sqrt(near[i, 0] + near_rest)
        dmax = jnp.sqrt(far[i, 0] + far_rest)
        # If every point j moves by <= margin_j, dmin_j and dmax_k change by <= margin_j, margin_k.
        thr = jnp.min(dmax + margin, axis=1, keepdims=True)
        return dmin - margin <= thr + 1e-5

    return jax.lax.map(slab, jnp.arange(m)).reshape(-1, n)


@jax.jit
def _nn_dist2(g: jax.Array) -> jax.Array:
    """Squared distance of every grid point to its nearest other grid point."""
    n = g.shape[0]
    iota = jnp.arange(n)

    def one(args):
        x, i = args
        return jnp.min(jnp.where(iota == i, jnp.inf, jnp.sum((g - x) ** 2, 1)))

    return jax.lax.map(one, (g, iota), batch_size=256)


@dataclasses.dataclass
class _CandidateTable:
    """Buckets of the box [-r0, r0]^p (m per axis) with the grid points that can be nearest there.

    A grid point j is a candidate for bucket B when min_{x in B} |x - g_j| <= min_k max_{x in B}
    |x - g_k| (otherwise some g_k is always closer). Built with per-point margins, the table stays
    valid until some grid point j has moved more than `margin[j]` from `anchor[j]`.
    """

    table: np.ndarray  # int32 (m^p, L)
    anchor: np.ndarray  # (n, p) grid at build time
    r0: float
    m: int
    margin: np.ndarray  # (n,)

    @classmethod
    def build(
        cls, g: np.ndarray, r0: float, m: int, rel_margin: float, min_width: int = 0
    ) -> _CandidateTable:
        # Margin: a fraction of each point's nearest-neighbour distance (sparse outer points move
        # most between iterations, and their margins only matter near them).
        gj = jnp.asarray(g, jnp.float32)
        nn = _nn_dist2(gj)
        margin = rel_margin * np.sqrt(np.asarray(nn, np.float64))
        mask = np.asarray(_bucket_masks(gj, r0, m, jnp.asarray(margin, jnp.float32)))
        cnt = mask.sum(1)
        width = max(min_width, int(-(-cnt.max() // 16) * 16))  # few widths: few compilations
        rows, cols = np.nonzero(mask)
        start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        table = np.repeat(cols[start][:, None], width, 1)  # pad with a real candidate
        table[rows, np.arange(rows.size) - start[rows]] = cols
        return cls(table.astype(np.int32), np.array(g), r0, m, margin)

    def valid_for(self, g: np.ndarray) -> bool:
        return bool(np.all(np.linalg.norm(g - self.anchor, axis=1) <= self.margin))


@functools.partial(jax.jit, static_argnames=("m", "chunk", "nchunks", "cap"))
def _lloyd_stats(g, table, key, r0, *, m, chunk, nchunks, cap):
    """Sums of fresh samples per nearest grid point, counts, and the total squared error."""
    n, p = g.shape
    g2 = jnp.sum(g * g, 1)
    w = 2.0 * r0 / m
    strides = jnp.asarray([m ** (p - 1 - d) for d in range(p)], jnp.int32)

    def body(carry, i):
        s, cnt, err = carry
        x = jax.random.normal(jax.random.fold_in(key, i), (chunk, p), jnp.float32)
        cell = jnp.clip(jnp.floor((x + r0) / w).astype(jnp.int32), 0, m - 1)
        cand = table[cell @ strides]  # (chunk, L)
        sc = 2.0 * jnp.einsum("cp,clp->cl", x, g[cand]) - g2[cand]
        code = jnp.take_along_axis(cand, jnp.argmax(sc, 1)[:, None], 1)[:, 0]
        # Samples outside the box: exact brute force on a compacted, fixed-size subset.
        out = jnp.any(jnp.abs(x) >= r0, axis=1)
        (oi,) = jnp.nonzero(out, size=cap, fill_value=chunk)
        xo = x[jnp.minimum(oi, chunk - 1)]
        so = 2.0 * xo @ g.T - g2
        code = code.at[oi].set(jnp.argmax(so, 1).astype(code.dtype), mode="drop")
        d = x - g[code]
        s = s + jax.ops.segment_sum(x, code, n)
        cnt = cnt + jax.ops.segment_sum(jnp.ones((chunk,), jnp.float32), code, n)
        over = jnp.maximum(jnp.sum(out) - cap, 0)
        return (s, cnt, err + jnp.sum(d * d)), over

    init = (jnp.zeros((n, p), jnp.float32), jnp.zeros((n,), jnp.float32), jnp.float32(0))
    (s, cnt, err), over = jax.lax.scan(body, init, jnp.arange(nchunks))
    return s, cnt, err, jnp.sum(over)


def _bucket_params(p: int, n: int) -> tuple[float, int]:
    """Box half-width r0 and buckets per axis m (about 1e-3 of samples fall outside the box)."""
    r0 = {2: 3.3, 3: 3.5, 4: 3.6}[p]
    cells_per_point = {2: 2.0, 3: 8.0, 4: 16.0}[p]
    m = max(2, round((cells_per_point * n) ** (1.0 / p)))
    if p == 4 and n <= 256:
        m = 1  # one bucket: brute force, as cheap here as any candidate list
    return r0, min(m, {2: 96, 3: 32, 4: 16}[p])


def _even_factors(n: int, p: int) -> list[int]:
    """n = 2^k split into p powers of two as evenly as possible (largest first)."""
    k = round(math.log2(n))
    return [2 ** (k // p + (1 if i < k % p else 0)) for i in range(p)]


def product_init(p: int, n: int, jitter: float, seed: int) -> np.ndarray:
    axes = [lloyd_max_1d(f)[0] for f in _even_factors(n, p)]
    g = np.array(list(itertools.product(*axes)), np.float64)
    rng = np.random.default_rng(seed)
    # Jitter (relative to the local 1-D spacing) breaks the square lattice's symmetry so that
    # Lloyd can move on to the better, hexagonal-like arrangements.
    spacing = np.stack(
        [
            np.interp(g[:, d], np.sort(a), np.gradient(np.sort(a)) if len(a) > 1 else [1.0])
            for d, a in enumerate(axes)
        ],
        1,
    )
    return g + jitter * spacing * rng.standard_normal(g.shape)


def stochastic_lloyd(
    g0: np.ndarray,
    schedule: list[tuple[int, int, float]],
    seed: int,
    chunk: int = 1 << 15,
    log=print,
) -> tuple[np.ndarray, dict]:
    """Lloyd iterations on fresh N(0, I) samples.

    schedule = [(iterations, samples per iteration, omega)]: each iteration moves every point to
    g + omega * (centroid - g); omega > 1 (over-relaxation) speeds up Lloyd's slow final
    convergence, and a last phase with omega = 1 and more samples lands on the fixed point.
    """
    n, p = g0.shape
    r0, m = _bucket_params(p, n)
    g = np.asarray(g0, np.float32)
    key = jax.random.key(seed)
    tab = None
    width = 0
    it = 0
    total = 0
    hist: list[float] = []
    rebuilds = 0
    calls_per_chunk = 8  # samples per compiled call = 8 * chunk; one compilation per table width
    for iters, samples, omega in schedule:
        ncalls = max(1, samples // (chunk * calls_per_chunk))
        for _ in range(iters):
            if tab is None or not tab.valid_for(g):
                tab = _CandidateTable.build(g, r0, m, 0.1, width)
                width = tab.table.shape[1]
                rebuilds += 1
            gj, tj = jnp.asarray(g), jnp.asarray(tab.table)
            s = np.zeros((n, p))
            cnt = np.zeros(n)
            err = 0.0
            for c in range(ncalls):
                si, ci, ei, over = _lloyd_stats(
                    gj, tj, jax.random.fold_in(jax.random.fold_in(key, it), c), r0,
                    m=m, chunk=chunk, nchunks=calls_per_chunk, cap=256,
                )  # fmt: skip
                s += np.asarray(si, np.float64)
                cnt += np.asarray(ci, np.float64)
                err += float(ei)
                if int(over):
                    log(f"    warning: {int(over)} out-of-box samples exceeded the cap")
            nsamp = ncalls * calls_per_chunk * chunk
            mse = err / (nsamp * p)
            hist.append(mse)
            keep = cnt > 0
            g = g.copy()
            cen = s[keep] / cnt[keep, None]
            g[keep] = (g[keep] + omega * (cen - g[keep])).astype(np.float32)
            it += 1
            total += nsamp
            if it % 10 == 0 or it == 1:
                log(
                    f"    it {it:4d} samples {nsamp:>9d} train mse {mse:.6g} L {width} rebuilds {rebuilds}"
                )
    return g, {"iterations": it, "train_samples": total, "train_mse_last": hist[-1]}


def measure_mse(g: np.ndarray, samples: int, seed: int, batch: int = 1 << 18) -> float:
    """Per-coordinate MSE of nearest-point quantization on fresh N(0, I_p) test samples."""
    _n, p = g.shape
    gj = jnp.asarray(g, jnp.float32)
    key = jax.random.key(seed)
    tot = 0.0
    for i in range(samples // batch):
        x = jax.random.normal(jax.random.fold_in(key, i), (batch, p), jnp.float32)
        code = nearest_brute(x, gj)
        tot += float(jnp.sum((x - gj[code]) ** 2))
    return tot / ((samples // batch) * batch * p)


def canonical(g: np.ndarray) -> np.ndarray:
    g = np.asarray(g, np.float32)
    order = np.lexsort(g.T[::-1])  # first coordinate is the primary key
    return np.ascontiguousarray(g[order])


def schedule_for(p: int, n: int) -> list[tuple[int, int, float]]:
    relax, final = max(1 << 18, 128 * n), max(1 << 20, 1024 * n)
    if n <= 1024:
        return [(100, relax, 1.7), (10, final, 1.0)]
    # n = 4096: the candidate lists get long in 4-D (~250 points), so fewer, costlier steps.
    return [(80 if p < 4 else 40, relax, 1.7), (4, final, 1.0)]


def make_grid(p: int, n: int, seed: int, log=print) -> tuple[np.ndarray, dict]:
    if p == 1:
        c, mse, it = lloyd_max_1d(n)
        return c[:, None], {"method": "lloyd-max exact", "iterations": it, "exact_mse": mse}
    g0 = product_init(p, n, jitter=0.2, seed=seed)
    init = "jittered product init"
    if n <= SMALL_N:
        # Few points: Lloyd has distinct local optima (e.g. rings vs a square for p=2, n=16).
        # Short runs from the product and from random draws of the optimal point density
        # N(0, (p+2)/p I); the best (lowest MSE on its last fresh samples) goes on.
        rng = np.random.default_rng(seed)
        starts = [g0] + [
            math.sqrt((p + 2) / p) * rng.standard_normal((n, p)) for _ in range(RESTARTS - 1)
        ]
        scores = []
        for i, s0 in enumerate(starts):
            gi, inf = stochastic_lloyd(
                s0, [(40, 1 << 18, 1.7), (5, 1 << 18, 1.0)], seed + 7 * i, log=lambda s: None
            )
            scores.append((inf["train_mse_last"], i, gi))
        best, i, g0 = min(scores, key=lambda t: (t[0], t[1]))
        init = f"best of {RESTARTS} short runs (start {i}: {'product' if i == 0 else 'random'})"
        log(f"    restarts: {[round(s[0], 6) for s in scores]} -> start {i}")
    g, info = stochastic_lloyd(g0, schedule_for(p, n), seed=seed, log=log)
    info.update(method=f"stochastic lloyd, {init}", train_seed=seed)
    return g, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("higgs_jax/data/grids"))
    ap.add_argument("--only", type=str, default="", help="comma list of pXnY, e.g. p2n256")
    ap.add_argument("--test-samples", type=int, default=TEST_SAMPLES)
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--test-seed", type=int, default=TEST_SEED)
    args = ap.parse_args(argv)
    todo = GRIDS
    if args.only:
        want = set(args.only.split(","))
        todo = tuple(pn for pn in GRIDS if f"p{pn[0]}n{pn[1]}" in want)
    args.out.mkdir(parents=True, exist_ok=True)
    man_path = args.out / "manifest.json"
    manifest = json.loads(man_path.read_text()) if man_path.exists() else {"grids": {}}
    t_all = time.time()
    for p, n in todo:
        t0 = time.time()
        print(f"p={p} n={n}", flush=True)
        g, info = make_grid(p, n, seed=args.seed + 1000 * p + n, log=lambda s: print(s, flush=True))
        g = canonical(g)
        name = f"gauss_p{p}_n{n}.npy"
        np.save(args.out / name, g)
        t_gen = time.time() - t0
        mse = measure_mse(g, args.test_samples, args.test_seed)
        entry = {
            "file": name, "p": p, "n": n, "bits": math.log2(n) / p,
            "mse": mse, "test_samples": args.test_samples, "test_seed": args.test_seed,
            "generation_seconds": round(t_gen, 1), **info,
        }  # fmt: skip
        manifest["grids"][f"p{p}_n{n}"] = entry
        manifest["grids"] = dict(
            sorted(manifest["grids"].items(), key=lambda kv: (kv[1]["p"], kv[1]["n"]))
        )
        manifest["command"] = "PYTHONPATH=. python scripts/make_grids.py --out higgs_jax/data/grids"
        man_path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(
            f"  -> {name}: test mse {mse:.6g} ({t_gen:.1f}s gen, {time.time() - t0:.1f}s total)",
            flush=True,
        )
    print(f"total {time.time() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
