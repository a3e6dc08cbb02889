"""Quantize one array to a `HiggsTensor`: pad -> (signs) -> rotate -> scale -> grid -> pack.

Glossary: K = contraction dim (`axis`), N = the other dim, h = Hadamard block, g = scale group,
p = grid dimension, t^2 = relative squared error ||W_hat - W||_F^2 / ||W||_F^2.

HIGGS (SPEC §1) scales each rotated group to unit mean square (scale = ||group|| / sqrt(g)) and
projects p-vectors to the MSE-optimal Gaussian grid. The RTN and NF4 baselines use the same
pipeline with no rotation (h = 1) and absmax scaling onto their own scalar grids, so all methods
share one tensor type, one dequantizer and one set of kernels.

Everything runs in one jitted function per (shape, spec); columns are processed in chunks
(`lax.map`) so memory stays bounded: a 14336 x 4096 matrix needs well under 2 GB.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax import grids, hadamard, packing
from higgs_jax.config import HiggsConfig, NF4Config, QuantSpec, RTNConfig, code_bits, scale_jnp_dtype
from higgs_jax.qtensor import HiggsTensor

# Weights per column chunk inside the jitted quantizer (bounds peak memory).
_CHUNK_WEIGHTS = 1 << 21


def resolve_layout(k: int, spec: QuantSpec) -> tuple[int, int, int]:
    """(h, g, K_pad) that `spec` uses for a contraction dim of size `k`.

    HIGGS with h not dividing K: policy "auto" takes the supported Hadamard order dividing K that
    is closest to h (within a factor of 2, or K itself when K < h); if none exists it pads K with
    zeros, using the largest power-of-two block <= h whose padding stays within K/8 (else h).
    Policy "pad" always pads K to a multiple of h. Padding is counted in bits/weight.
    Baselines pad K to a multiple of their group size.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"contraction dim must be a positive integer, got {k!r}")
    if not isinstance(spec, HiggsConfig):
        g = spec.group_size
        return 1, g, -(-k // g) * g
    h, p = spec.hadamard_size, spec.p
    g = spec.group_size or h
    if k % h == 0:
        return h, g, k
    if spec.indivisible == "error":
        raise ValueError(
            f"hadamard_size={h} does not divide K={k} and indivisible='error' "
            "(use 'auto' for a non-power-of-two Hadamard or 'pad')"
        )
    if spec.indivisible == "auto":
        best = None
        for d in range(p, k + 1):
            if k % d or d % p or not hadamard.is_hadamard_order(d):
                continue
            if spec.group_size is not None and d % spec.group_size:
                continue
            if not (h / 2 <= d <= 2 * h or (d == k and k < h)):
                continue
            key = (abs(math.log(d / h)), -d)
            if best is None or key < best[0]:
                best = (key, d)
        if best is not None:
            d = best[1]
            return d, spec.group_size or d, k
        # No order divides K: pad, with the largest power-of-two block <= h that keeps the
        # padding within 1/8 of K (e.g. K = 172, h = 512 -> h = 64, K_pad = 192).
        hp = 1 << (h.bit_length() - 1)
        while hp >= max(2, p):
            gp = spec.group_size or hp
            if hp % gp == 0 and hp % p == 0 and (-(-k // hp) * hp - k) * 8 <= k:
                return hp, gp, -(-k // hp) * hp
            hp //= 2
    return h, g, -(-k // h) * h


def expected_bits_per_weight(shape: tuple[int, ...], spec: QuantSpec, axis: int = 0) -> float:
    """bits/weight a quantized array of `shape` will take (codes + scales + padding + signs),
    computed from shapes alone so a model can be planned before any weight is touched."""
    k, n = _check_shape_axis(shape, axis)
    h, g, k_pad = resolve_layout(k, spec)
    grid = spec.grid
    bits = packing.packed_rows(k_pad // grid.p, code_bits(grid)) * 32 * n
    bits += (k_pad // g) * n * jnp.dtype(scale_jnp_dtype(spec.scale_dtype)).itemsize * 8
    if isinstance(spec, HiggsConfig) and spec.random_signs:
        bits += k_pad * 8
    return bits / (k * n)


def _check_shape_axis(shape, axis) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"only 2-D weights can be quantized, got shape {tuple(shape)}")
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"axis must be 0 or 1 (the contraction axis), got {axis!r}")
    axis = axis % 2
    return shape[axis], shape[1 - axis]


def _scale_rule(spec: QuantSpec) -> str:
    return "rms" if isinstance(spec, HiggsConfig) else "absmax"


@functools.partial(
    jax.jit,
    static_argnames=("grid", "h", "g", "k", "rule", "scale_dtype", "chunk"),
)
def _quantize_kn(w, signs, *, grid, h, g, k, rule, scale_dtype, chunk):
    """w: f32 (K_pad, N_pad) with N_pad % chunk == 0. Returns packed codes, scales, err2, norm2."""
    k_pad, n_pad = w.shape
    p = grid.p
    lut = jnp.asarray(grids.grid_values(grid), jnp.float32)  # (n, p)
    level_max = float(np.max(np.abs(grids.grid_values(grid))))
    sdt = scale_jnp_dtype(scale_dtype)

    def one_chunk(wc):  # (K_pad, c)
        c = wc.shape[1]
        x = wc if signs is None else wc * signs.astype(jnp.float32)[:, None]
        r = hadamard.block_hadamard(x, h, axis=0, normalize=True) if h > 1 else x
        rg = r.reshape(k_pad // g, g, c)
        if rule == "rms":
            s = jnp.sqrt(jnp.mean(rg * rg, axis=1))
        else:
            s = jnp.max(jnp.abs(rg), axis=1) / level_max
        s = s.astype(sdt).astype(jnp.float32)  # quantize against the scale actually stored
        u = rg / jnp.where(s > 0, s, 1.0)[:, None, :]
        v = jnp.swapaxes(u.reshape(k_pad // p, p, c), 1, 2)  # (Kc, c, p)
        codes = grids.nearest_code(v.reshape(-1, p), grid).reshape(k_pad // p, c)
        deq = jnp.swapaxes(jnp.take(lut, codes, axis=0), 1, 2).reshape(k_pad // g, g, c)
        deq = (deq * s[:, None, :]).reshape(k_pad, c)
        if h > 1:
            deq = hadamard.block_hadamard(deq, h, axis=0, normalize=True, transpose=True)
        if signs is not None:
            deq = deq * signs.astype(jnp.float32)[:, None]
        diff = deq[:k] - wc[:k]
        err2 = jnp.sum(diff * diff, axis=0)
        norm2 = jnp.sum(wc[:k] * wc[:k], axis=0)
        return codes, s.astype(sdt), err2, norm2

    chunks = jnp.moveaxis(w.reshape(k_pad, n_pad // chunk, chunk), 1, 0)
    codes, scales, err2, norm2 = jax.lax.map(one_chunk, chunks)
    codes = jnp.moveaxis(codes, 0, 1).reshape(k_pad // p, n_pad)
    scales = jnp.moveaxis(scales, 0, 1).reshape(k_pad // g, n_pad)
    packed = packing.pack_codes(codes, code_bits(grid))
    return packed, scales, err2.reshape(-1), norm2.reshape(-1)


def quantize_with_error(
    w: jax.Array, spec: QuantSpec, *, axis: int, key: jax.Array | None = None
) -> tuple[HiggsTensor, float]:
    """Quantizes a 2-D array along its contraction `axis`; returns the tensor and its t^2.

    Args:
      w: float array of shape (K, N) for axis=0 (Flax kernel) or (N, K) for axis=1.
      spec: HiggsConfig, RTNConfig or NF4Config.
      axis: the contraction axis. Explicit: it is never guessed from the shape.
      key: PRNG key; required when `spec.random_signs` is set.

    Returns:
      (HiggsTensor, t2) with t2 = ||dequantize(qt) - w||^2 / ||w||^2 (0 for an all-zero w).
    """
    if not isinstance(spec, (HiggsConfig, RTNConfig, NF4Config)):
        raise ValueError(f"spec must be a HiggsConfig, RTNConfig or NF4Config, got {spec!r}")
    shape = tuple(w.shape)
    k, n = _check_shape_axis(shape, axis)
    axis = axis % 2
    dtype = jnp.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"only floating-point weights can be quantized, got dtype {dtype}")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        bad = int(jnp.sum(~jnp.isfinite(w)))
        raise ValueError(f"weight of shape {shape} contains {bad} NaN/Inf values")
    h, g, k_pad = resolve_layout(k, spec)
    grid = spec.grid
    if k_pad % grid.p:
        raise ValueError(f"p={grid.p} does not divide the padded K={k_pad}")

    wk = jnp.asarray(w, jnp.float32)
    if axis == 1:
        wk = wk.T
    chunk = max(1, min(n, _CHUNK_WEIGHTS // k_pad))
    n_pad = -(-n // chunk) * chunk
    wk = jnp.pad(wk, [(0, k_pad - k), (0, n_pad - n)])

    signs = None
    if isinstance(spec, HiggsConfig) and spec.random_signs:
        if key is None:
            raise ValueError("spec.random_signs=True needs a PRNG key (quantize(..., key=...))")
        signs = hadamard.random_signs(key, k_pad)

    packed, scales, err2, norm2 = _quantize_kn(
        wk,
        signs,
        grid=grid,
        h=h,
        g=g,
        k=k,
        rule=_scale_rule(spec),
        scale_dtype=spec.scale_dtype,
        chunk=chunk,
    )
    qt = HiggsTensor(
        codes=packed[:, :n],
        scales=scales[:, :n],
        signs=signs,
        shape=shape,
        dtype=dtype.name,
        grid=grid,
        hadamard_size=h,
        group_size=g,
        k_pad=k_pad,
        contraction_axis=axis,
    )
    total = float(jnp.sum(norm2[:n]))
    t2 = float(jnp.sum(err2[:n])) / total if total > 0 else 0.0
    return qt, t2


def quantize(
    w: jax.Array, spec: QuantSpec, *, axis: int, key: jax.Array | None = None
) -> HiggsTensor:
    """Like `quantize_with_error`, returning only the tensor."""
    return quantize_with_error(w, spec, axis=axis, key=key)[0]


def layer_key(key: jax.Array | None, path: str) -> jax.Array | None:
    """A per-layer key that depends on the layer's path, not on traversal order."""
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
