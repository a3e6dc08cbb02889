"""Byte-LUT GEMV kernel for small M (decode): y_partial = x_rot · decode(words) · scales.

Glossary (as in kernel.py): M rows of x (padded to a power of two, M <= 8), p grid dimension,
cb code bits (2, 4 or 8 here: codes never straddle a byte), unit = 32 codes of one column
(cb uint32 words), BKU units x BN columns per loop step, S = split_k programs along K.

Why a second kernel: Nsight Compute on the plane kernel (kernel.py, H100, 8192x28672, M=1)
showed ~6 SASS instructions per weight (shift, extract, address, LUT load, FMUL, FADD — XLA's
Triton pipeline does not fuse the multiply-add) at ~45% issue utilisation, with warps mostly
stalled on the weight-word loads, which were issued lazily plane by plane and never prefetched.
This kernel:
- decodes a whole *byte* of codes per table lookup: byte value e of a word indexes tables of
  bf16 pairs, ``lut[q * 256 + e]`` = weights (2q, 2q+1) of that byte, where the byte's
  weights are ordered (code j, coordinate d) — 2 weights per lookup for 4-bit p=1 and 8-bit
  p=2 codes, 4 weights (two lookups of one index) for 2-bit p=1 and 4-bit p=2 codes;
- unpacks a pair and does both multiply-adds in one inline-PTX block (shift, and, 2 FFMA);
- extracts bytes with one PTX ``prmt`` each;
- loads every word row (and the scales) of the *next* tile before computing on the current one
  (software pipelining in registers through the loop carry), so DRAM latency overlaps compute.
The grid values are rounded to bf16 in the tables (2^-9 relative, far below the quantization
error), as for the ``gather_pair`` decoder.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.higgs_matmul.kernel import tile_mask_and_scales, x_plane

#: Code widths whose codes never straddle a byte.
BYTE_CODE_BITS = (2, 4, 8)


def byte_weights(p: int, cb: int) -> list[tuple[int, int]]:
    """(code j within the byte, coordinate d) of each weight a byte holds, in table order."""
    if cb not in BYTE_CODE_BITS:
        raise ValueError(f"the byte-LUT kernel needs code_bits in {BYTE_CODE_BITS}, got {cb}")
    return [(j, d) for j in range(8 // cb) for d in range(p)]


def code_lut(grid_values, p: int) -> np.ndarray:
    """n-entry table for per-code lookups: f32 values (p = 1) or uint32 bf16 pairs (p = 2)."""
    gv = np.asarray(grid_values, np.float32).reshape(-1, p)
    if p == 1:
        return gv[:, 0].copy()
    if p != 2:
        raise ValueError(f"per-code lookup supports p in (1, 2), got p={p}")
    bits = gv.astype(jnp.bfloat16).view(np.uint16).astype(np.uint32)
    return (bits[:, 0] | (bits[:, 1] << np.uint32(16))).astype(np.uint32)


def byte_lut(grid_values, p: int, cb: int) -> np.ndarray:
    """uint32[(W/2) * 256] tables of bf16 pairs for the W weights of every byte value."""
    gv = np.asarray(grid_values, np.float32).reshape(-1, p)  # (n, p)
    bits = gv.astype(jnp.bfloat16).view(np.uint16).astype(np.uint32)
    e = np.arange(256, dtype=np.uint32)
    mask = np.uint32((1 << cb) - 1)
    ws = byte_weights(p, cb)
    vals = [bits[(e >> np.uint32(j * cb)) & mask, d] for j, d in ws]  # each (256,)
    tables = [vals[2 * q] | (vals[2 * q + 1] << np.uint32(16)) for q in range(len(ws) // 2)]
    return np.concatenate(tables).astype(np.uint32)


def higgs_gemv_kernel(
    x_ref,  # (Mp, NB, p, 32, XB) f32: blocked rotated activations (kernel.x_plane)
    w_ref,  # (U, cb, N) uint32 kernel-layout codes
    s_ref,  # (G, N) scales
    lut_ref,  # (W/2 * 256,) uint32 bf16-pair tables
    o_ref,  # (S, Mp, N_out) f32 partial sums
    *,
    p: int,
    cb: int,
    units: int,
    bku: int,
    bn: int,
    steps: int,
    n_cols: int,
    group_units_num: int,
    group_units_den: int,
    num_groups: int,
    m_rows: int,
    mask_rows: bool,
    mask_cols: bool,
    xblk: int,
    interpret: bool,
    lookup: str = "byte",
    volatile: bool = False,
):
    j = pl.program_id(0)
    s = pl.program_id(1)
    n0 = pl.multiple_of(j * bn, bn)
    cols = n0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    cpw = 32 // cb  # codes per word
    cpb = 8 // cb  # codes per byte
    ws = byte_weights(p, cb)

    def load_tile(it):
        u0 = pl.multiple_of((s * steps + it) * bku, bku)
        rows = u0 + lax.broadcasted_iota(jnp.int32, (bku,), 0)
        mask, scl = tile_mask_and_scales(
            s_ref,
            rows,
            cols,
            bku=bku,
            bn=bn,
            units=units,
            n_cols=n_cols,
            group_units_num=group_units_num,
            group_units_den=group_units_den,
            num_groups=num_groups,
            mask_rows=mask_rows,
            mask_cols=mask_cols,
        )
        vol = volatile and not interpret
        words = tuple(
            _compat.load(
                w_ref.at[pl.ds(u0, bku), jnp.int32(t), pl.ds(n0, bn)],
                mask=mask,
                other=0 if mask is not None else None,
                volatile=vol,
            )
            for t in range(cb)
        )
        return words, scl

    def step(it, carry):
        (words, scl), acc = carry
        nxt = load_tile(jnp.minimum(it + 1, steps - 1))  # prefetch (last step reloads itself)
        u0 = pl.multiple_of((s * steps + it) * bku, bku)
        partial = [jnp.zeros((bku, bn), jnp.float32) for _ in range(m_rows)]
        xcache = {}

        def xv(m, d, c):
            if (m, d, c) not in xcache:
                xs = x_plane(x_ref, m, d, c, u0, bku=bku, xblk=xblk).astype(jnp.float32)
                xcache[(m, d, c)] = jnp.broadcast_to(xs[:, None], (bku, bn))
            return xcache[(m, d, c)]

        for t in range(cb):
            for b in range(4):
                idx = _compat.byte_of(words[t], b, interpret=interpret)
                c_first = t * cpw + b * cpb
                if lookup == "code":
                    # One lookup per code in an n-entry table: f32 values (p = 1) or bf16 pairs
                    # (p = 2); small tables (n <= 16: one 64-byte line) cost one L1 wavefront.
                    for jj in range(cpb):
                        code = idx if cpb == 1 else (idx >> (jj * cb)) & ((1 << cb) - 1)
                        v = lut_ref[code]
                        for m in range(m_rows):
                            if p == 1:
                                partial[m] = _compat.fma_f32(
                                    v, xv(m, 0, c_first + jj), partial[m], interpret=interpret
                                )
                            else:
                                partial[m] = _compat.bf16_pair_fma(
                                    v,
                                    xv(m, 0, c_first + jj),
                                    xv(m, 1, c_first + jj),
                                    partial[m],
                                    interpret=interpret,
                                )
                    xcache.clear()
                    continue
                for q in range(len(ws) // 2):
                    pair = lut_ref[idx + q * 256] if q else lut_ref[idx]
                    (ja, da), (jb, db) = ws[2 * q], ws[2 * q + 1]
                    for m in range(m_rows):
                        partial[m] = _compat.bf16_pair_fma(
                            pair,
                            xv(m, da, c_first + ja),
                            xv(m, db, c_first + jb),
                            partial[m],
                            interpret=interpret,
                        )
                xcache.clear()  # keep only the current byte's activations live
        acc = tuple(acc[m] + partial[m] * scl for m in range(m_rows))
        return nxt, acc

    init = (load_tile(0), tuple(jnp.zeros((bku, bn), jnp.float32) for _ in range(m_rows)))
    _, out = lax.fori_loop(0, steps, step, init)
    for m in range(m_rows):
        o_ref[s, m, pl.ds(n0, bn)] = jnp.sum(out[m], axis=0)
