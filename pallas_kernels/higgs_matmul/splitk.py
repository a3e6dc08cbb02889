"""Split-K partial sums summed inside the kernel (``Config.reduce = "kernel"``).

With ``reduce = "xla"`` every program (j, s, i) stores its (rows, BN) partial sum in slice s of an
(S, Mp, N) float32 output and XLA sums the S slices afterwards (plus the bias and the cast): one
more kernel launch and S x M x N x 4 bytes written and read back, unless XLA fuses the sum into
the consumer (it does inside a model: residual add, SiLU·up). With ``reduce = "kernel"`` the
kernel finishes the job itself, a serial fix-up in the style of split-K GEMMs:

1. each program stores its partial sum as before, then a block barrier (every thread's stores
   issued before ...);
2. one atomic add (acquire-release, GPU scope; Triton executes a scalar atomic once per program
   and broadcasts the old value) on a per-output-tile counter;
3. the program that sees S - 1 is the last of its tile: it reads the S partial sums in a fixed
   order (so the result does not depend on which program came last), adds the bias, and stores
   the tile in the output dtype.

The counters start at zero (a zeroed int32 operand, aliased to an output so the kernel may write
it). One launch replaces two, and the output is (M, N) in the activation dtype with the bias
applied. In interpret mode the grid runs in order, so the last program of a tile is the one with
s = S - 1; the barrier is a GPU-only instruction and is skipped there.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat


def finish_tile(
    o_ref,  # (S, Mp, N_out) f32: the partial sums, this program's slice already stored
    y_ref,  # (Mp, N_out) output dtype
    cnt_ref,  # (tiles,) int32 counters, zero at launch
    b_ref,  # (1, N_out) f32 bias, or None
    *,
    tile,
    split: int,
    r0,
    rows: int,
    n0,
    bn: int,
    interpret: bool,
) -> None:
    """Sum the split-K partials of the output tile (rows [r0, r0 + rows), columns [n0, n0 + bn))
    if this program is the last of its tile to finish; see the module docstring."""
    # the counter, not the program's own split index, says which program is last
    def write():
        tot = None
        for t in range(split):
            part = _compat.load(
                o_ref.at[pl.ds(t, 1), pl.ds(r0, rows), pl.ds(n0, bn)], volatile=not interpret
            )[0]
            tot = part if tot is None else tot + part
        if b_ref is not None:
            tot = tot + b_ref[:, pl.ds(n0, bn)]
        y_ref[pl.ds(r0, rows), pl.ds(n0, bn)] = tot.astype(y_ref.dtype)

    _compat.block_barrier(interpret=interpret)
    if split == 1:
        write()
        return
    old = _compat.atomic_add(cnt_ref, tile, jnp.ones((), jnp.int32))
    pl.when(old == split - 1)(write)


def with_fixup(body, *, n_in: int, has_bias: bool, split: int, bn: int, rows: int,
               rows_per_program: bool, tiles_i: int, interpret: bool):
    """Kernel ``body(*inputs, o_ref)`` -> a kernel over ``(*inputs, [bias], counters, o_ref,
    y_ref, counters_out)`` that runs ``body`` and then `finish_tile` on its output tile.
    ``rows_per_program``: the program's rows are [i rows, (i + 1) rows) (grid axis 2), else all
    ``rows`` rows; ``tiles_i``: programs along grid axis 2."""

    def kernel(*refs):
        ins = refs[:n_in]
        b_ref = refs[n_in] if has_bias else None
        o_ref, y_ref, cnt_ref = refs[-3:]
        body(*ins, o_ref)
        j, i = pl.program_id(0), pl.program_id(2)
        finish_tile(
            o_ref, y_ref, cnt_ref, b_ref, tile=j * tiles_i + i, split=split,
            r0=i * rows if rows_per_program else 0, rows=rows,
            n0=pl.multiple_of(j * bn, bn), bn=bn, interpret=interpret,
        )

    return kernel
