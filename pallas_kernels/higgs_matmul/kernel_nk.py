"""Pallas (Triton backend) kernel body of the "nk" path: p = 1 weights in the nk16 layout
(`nkpair.py`), the decoded weights as a tensor-core operand straight from registers.

Glossary as in kernel.py: M rows of x, N columns, unit = 32 codes of one column, BKU units per
loop step (the K of each plane's dot), BN columns and BM rows per program, S = split_k, plane c =
the c-th code of every unit, R = 2 cb uint16 rows per unit, F = 16 / cb planes per row.

Grid (N / BN, S, M / BM), the same as the plane kernel. Program (j, s, i) loops over its tiles of
BKU = 16 units (one stored block of the nk16 layout per ``row_steps`` loop steps, see below); per
tile and row r it loads one
(BN, 16) uint16 tile (BN x 32 contiguous bytes) and for each of the row's F planes decodes it with
one unary PTX block per two weights (`nkpair.decode`) and multiplies, f32 accumulation
(`_compat.dot_acc`), in one of two operand orders:
- "wx": ``acc (BN, mm) += plane (BN, BKU) @ x_plane.T``. On Hopper a warpgroup MMA
  (``HGMMA.64xmmx16``) with the decoded weights in registers; Triton waits for each one before the
  next plane is decoded (session 11). The default at 64-row blocks.
- "xw": the word tile is transposed once (still integer words), then ``acc (mm, BN) += x_plane
  (mm, BKU) @ plane (BKU, BN)``. At 16 rows (or 16/32-row sub-dots) these are warp-level MMAs
  (``HMMA.16816``) with the decoded plane as the second operand in registers and no waits; the
  default at 16-row blocks (session 12: 4-bit 8192x28672, M = 16, 89.9 vs 99.2 us for "wx").
Either way the pack-2 asm pairs units 2i, 2i + 1: both the load's register order and the MMA
operand's run along the units, whether or not Triton hoists the operand layout to the load.
With ``row_steps`` > 1 a stored block takes that many loop steps, each reading R / row_steps
word rows and their planes. Triton stages one loop step's copies per pipeline buffer, and at
``num_stages`` = 2 it keeps a single buffer: the next step's copies are issued at the end of the
loop body and awaited at the top of the next one (session 13, Nsight). Smaller steps let
``num_stages`` >= 3 double-buffer in the shared memory one whole-block step took.
The tile lies in one scale group (the wrapper checks), so the tile's sum is scaled once per
column. Partial sums (S, M, N) are reduced outside (wrapper), as for the plane kernel.
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
    w_ref,  # (U / 16, R, N, 16) uint16: stored nk16 words
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
    dot_order: str = "wx",
    row_steps: int = 1,
    interpret: bool = False,
):
    """Kernel body; see the module docstring. ``mma_m``: rows of x per dot (the program's BM
    rows are BM / mma_m dots sharing each decoded plane). ``dot_order``: "wx" (decoded plane
    (BN, BKU) as the first operand, accumulating (BN, mm)) or "xw" (the word tile transposed
    before decoding, so the plane is the (BKU, BN) second operand, accumulating (mm, BN)).
    ``row_steps``: loop steps per stored block; each step reads R / row_steps word rows (and
    their planes), so a pipeline stage holds that fraction of a block (see the module
    docstring)."""
    if dot_order not in ("wx", "xw"):
        raise ValueError(f"dot_order must be 'wx' or 'xw', got {dot_order!r}")
    xw = dot_order == "xw"
    if bku != _nkpair.BLOCK_UNITS:
        raise ValueError(f"the nk path reads one {_nkpair.BLOCK_UNITS}-unit block per step, got {bku}")
    mm = mma_m or bm
    if bm % mm or mm < 16:
        raise ValueError(f"mma_m={mma_m} must be >= 16 and divide block_m={bm}")
    nsub = bm // mm
    F = _nkpair.planes_per_row(cb)
    R = 2 * cb
    if row_steps < 1 or R % row_steps:
        raise ValueError(f"row_steps={row_steps} must divide the {R} word rows of {cb}-bit codes")
    rp = R // row_steps  # word rows per loop step
    j = pl.program_id(0)
    s = pl.program_id(1)
    i = pl.program_id(2)
    n0 = pl.multiple_of(j * bn, bn)
    cols = n0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0)  # (BN, 1)
    xdt = x_ref.dtype
    acc_shape = (mm, bn) if xw else (bn, mm)

    def step(it, state):
        # the step's block of the stored layout and its first word row (shifts: row_steps is a
        # power of two, and Triton's lowering of jnp's floor // and % fails on int32 here)
        sh = row_steps.bit_length() - 1
        ub = s * steps + lax.shift_right_logical(it, sh)
        r0 = (it & (row_steps - 1)) * rp
        u0 = pl.multiple_of(ub * bku, bku)
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
        if xw:
            scl = scl.T  # (1, BN)
        acc = [jnp.zeros(acc_shape, jnp.float32) for _ in range(nsub)]
        for rr in range(rp):
            r = r0 + rr if row_steps > 1 else jnp.int32(rr)
            tile = _compat.load(
                w_ref.at[ub, r, pl.ds(n0, bn), pl.ds(0, bku)], mask=mask, other=0
            )  # (BN, BKU) uint16: BN x 32 contiguous bytes
            if xw:
                # (BKU, BN): pairs of units stay adjacent in a thread's registers whether or not
                # Triton hoists the dot operand's layout to the load (both layouts are k-major),
                # which is what the pack-2 asm needs
                tile = tile.T
            for f in range(F):
                v = _nkpair.decode(
                    tile, grid_values, cb, f, xdt, interpret=interpret, pair_axis=0 if xw else 1
                )
                c = r * F + f
                for q in range(nsub):
                    xs = x_plane(x_ref, pl.ds(i * bm + q * mm, mm), 0, c, u0, bku=bku, xblk=xblk)
                    if xw:
                        acc[q] = _compat.dot_acc(xs, v, acc[q], interpret=interpret)
                    else:
                        acc[q] = _compat.dot_acc(v, xs.T, acc[q], interpret=interpret)
        return tuple(state[q] + acc[q] * scl for q in range(nsub))

    init = tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(nsub))
    out = lax.fori_loop(0, steps * row_steps, step, init)
    for q in range(nsub):
        o_ref[s, pl.ds(i * bm + q * mm, mm), pl.ds(n0, bn)] = out[q] if xw else out[q].T
