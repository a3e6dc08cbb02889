"""Pallas (Triton backend) kernel body of the "nk" path: p = 1 weights in the nk16 layout
(`nkpair.py`), the decoded weights as the first tensor-core operand, straight from registers.

Glossary as in kernel.py: M rows of x, N columns, unit = 32 codes of one column, BKU units per
loop step (the K of each plane's dot), BN columns and BM rows per program, S = split_k, plane c =
the c-th code of every unit, R = 2 cb uint16 rows per unit, F = 16 / cb planes per row.

Grid (N / BN, S, M / BM), the same as the plane kernel. Program (j, s, i) loops over its tiles of
BKU units; per tile and row r it loads one (BN, BKU) uint16 tile (a plain load: the layout is
columns-major, so no transpose sits between the load and the dot) and for each of the row's F
planes decodes it to (BN, BKU) bf16/f16 values with one unary PTX block per two weights
(`nkpair.decode`) and multiplies: ``acc (BN, mm) += plane (BN, BKU) @ x_plane.T (BKU, mm)``,
``_compat.dot_acc``, f32 accumulation. The tile lies in one scale group (the wrapper checks), so
the tile's sum is scaled once per column. The (BN, BM) result is transposed once at the store.
Partial sums (S, M, N) are reduced outside (wrapper), as for the plane kernel.

On Hopper the dot is a warpgroup MMA (``HGMMA.64xmmx16``, offline SASS) whose first operand comes
from registers, so no decoded plane goes through shared memory, and one warpgroup dot per plane
decodes each weight once whatever the program's rows. Measured (H100, session 11): no faster than
the plane kernel at 4 bits, because Triton waits for each MMA before the next plane is decoded
(docs/KERNELS.md); an option, not a default.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.higgs_matmul import nkpair as _nkpair
from pallas_kernels.higgs_matmul.kernel import x_plane


def nk_kernel(
    x_ref,  # (Mp, NB, 1, 32, XB) activation dtype: blocked activations (kernel.x_plane)
    w_ref,  # (R, N, U) uint16: nk16 words
    s_ref,  # (G, N) scales
    o_ref,  # (S, Mp, N_out) f32 partial sums
    *,
    cb: int,
    grid_values,
    units: int,
    bku: int,
    bn: int,
    bm: int,
    mma_m: int,
    steps: int,
    n_cols: int,
    group_units_num: int,
    group_units_den: int,
    num_groups: int,
    mask_rows: bool,
    mask_cols: bool,
    xblk: int,
    interpret: bool = False,
):
    """Kernel body; see the module docstring. ``mma_m``: rows of x per dot (the program's BM
    rows are BM / mma_m dots sharing each decoded plane)."""
    mm = mma_m or bm
    if bm % mm or mm < 16:
        raise ValueError(f"mma_m={mma_m} must be >= 16 and divide block_m={bm}")
    nsub = bm // mm
    F = _nkpair.planes_per_row(cb)
    j = pl.program_id(0)
    s = pl.program_id(1)
    i = pl.program_id(2)
    n0 = pl.multiple_of(j * bn, bn)
    cols = n0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0)  # (BN, 1)
    xdt = x_ref.dtype

    def step(it, state):
        u0 = pl.multiple_of((s * steps + it) * bku, bku)
        mask = None
        if mask_rows:
            ucols = u0 + lax.broadcasted_iota(jnp.int32, (1, bku), 1)
            mask = jnp.broadcast_to(ucols < units, (bn, bku))
        if mask_cols:
            cm = jnp.broadcast_to(cols < n_cols, (bn, bku))
            mask = cm if mask is None else mask & cm
        # the tile's scale group: one scale per column, applied to the tile's sum
        g = jnp.minimum((u0 * group_units_num) // group_units_den, num_groups - 1)
        c1 = jnp.minimum(cols, n_cols - 1) if mask_cols else cols
        scl = _compat.load(
            s_ref.at[jnp.broadcast_to(g, (bn, 1)), c1],
            mask=(cols < n_cols) if mask_cols else None,
            other=0,
        ).astype(jnp.float32)  # (BN, 1)
        acc = [jnp.zeros((bn, mm), jnp.float32) for _ in range(nsub)]
        for r in range(2 * cb):
            tile = _compat.load(
                w_ref.at[jnp.int32(r), pl.ds(n0, bn), pl.ds(u0, bku)], mask=mask, other=0
            )  # (BN, BKU) uint16
            for f in range(F):
                v = _nkpair.decode(tile, grid_values, cb, f, xdt, interpret=interpret)
                c = r * F + f
                for q in range(nsub):
                    xs = x_plane(x_ref, pl.ds(i * bm + q * mm, mm), 0, c, u0, bku=bku, xblk=xblk)
                    acc[q] = _compat.dot_acc(v, xs.T, acc[q], interpret=interpret)
        return tuple(state[q] + acc[q] * scl for q in range(nsub))

    init = tuple(jnp.zeros((bn, mm), jnp.float32) for _ in range(nsub))
    out = lax.fori_loop(0, steps, step, init)
    for q in range(nsub):
        o_ref[s, pl.ds(i * bm + q * mm, mm), pl.ds(n0, bn)] = out[q].T
