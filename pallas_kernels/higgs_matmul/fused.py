"""The activation rotation in the matmul kernel's prologue (``Config.rotation = "fused"``).

With ``rotation = "kernel"`` the op is two launches: `rotate.py` writes the rotated activations
in the kernel's blocked layout, then the matmul kernel reads them. Here the matmul kernel does
both. Program (j, s) of the "fma" path consumes units [s T, (s + 1) T) of every column (T = steps
x BKU); before its main loop it

1. loads the raw (Mp, h) windows of x for every Hadamard block b its units touch (masked: zero
   beyond M and K), applies the random signs, and rotates each with `rotate.rotate_window`
   (two small dots with the Sylvester factors H_32 and H_XB);
2. stores the result in the blocked layout into a scratch output of the launch, (N / BN x Mp,
   NB, 1, 32, XB) float32: column block j owns rows [j Mp, (j + 1) Mp), so no two column blocks
   write the same lines (with one scratch shared by all of them, the 112 column blocks of
   4096x14336 wrote the same lines and the op took 44 instead of 26 us on an H100);
3. waits at a block barrier (``bar.sync``: the program's stores are visible to all its threads);

and then runs the unchanged kernel body on its rows of the scratch as its activations
(`kernel.higgs_matmul_kernel` with ``x_rows_per_column_block``). Programs of one column block
with different s write disjoint blocks, except where a block is shared by several split-K
programs (T < XB); those write the same values, computed by the same instructions from the same
inputs. Every block a program reads is one it wrote (the blocks its unit range touches, clamped
to the last block), so no unwritten scratch is ever read.

Cost: each program rotates the blocks of its own K range (nothing is shared across programs),
T / XB blocks, or one whole block when T < XB (then split-K programs repeat the same block), in
series before its first weight load. Measured on an H100 (session 17, full op, M = 1, p = 1,
`benchmarks/results/s17/fused_private/`): within +-1.5 us of the separate rotation kernel at
4096x14336, 14336x4096 and 4096x4096, but 63.7 -> 81.9 us (4-bit) and 50.2 -> 59.4 us (2-bit)
at 8192x28672, where 896 programs each rotate two 1024-blocks. So it is an option
(``Config.rotation = "fused"``), and the separate kernel (``"kernel"``) stays the default.

Scope: the "fma" path (M <= 8), p = 1, power-of-two h in 512..2048 whose blocks are whole
activation blocks (`wrapper.activation_block`), ``reduce = "xla"``. Elsewhere the wrapper keeps
the separate rotation of ``rotation = "kernel"`` (the same values; `applies` says why).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.higgs_matmul import rotate as _rotate


def applies(p: int, h: int, path: str, reduce: str, by_matmul: bool) -> tuple[bool, str]:
    """(ok, reason): whether a launch can rotate in its prologue."""
    ok, why = _rotate.supported(p, h)
    if not ok:
        return False, why
    if path != "fma":
        return False, f"path={path!r} (the fused rotation runs on path='fma')"
    if reduce != "xla":
        return False, f"reduce={reduce!r} (the fused rotation needs reduce='xla')"
    if not by_matmul:
        return False, "the Hadamard blocks are not whole activation blocks of the kernel layout"
    return True, "ok"


def blocks_per_program(steps: int, bku: int, xb: int) -> int:
    """Hadamard blocks (of XB units) that the unit range [s T, (s + 1) T) of one program can
    touch, T = steps x BKU: T / XB when aligned, one when the range sits inside one block, else
    ceil(T / XB) + 1 (a range that starts mid-block)."""
    t = steps * bku
    if t % xb == 0:
        return t // xb
    if xb % t == 0:
        return 1
    return -(-t // xb) + 1


def with_rotation(
    body,
    *,
    h: int,
    m: int,
    k: int,
    mp: int,
    nb: int,
    steps: int,
    bku: int,
    has_signs: bool,
    interpret: bool,
):
    """Kernel ``body(x_ref, w_ref, s_ref, lut_ref, o_ref)`` (x in the blocked layout; built with
    ``x_rows_per_column_block=Mp``, so column block j reads rows [j Mp, (j + 1) Mp)) -> a kernel
    over ``(x_raw (M, K) [or padded in interpret mode], w, scales, lut, [signs (1, NB h)],
    H_32, H_XB, o_ref, xs_ref)`` that rotates its blocks into its column block's rows of
    ``xs_ref`` (N / BN x Mp, NB, 1, 32, XB) first; see the module docstring."""
    xb = h // 32
    nblk = min(nb, blocks_per_program(steps, bku, xb))
    mask = _rotate.needs_mask(m, k, mp, nb, h)

    def kernel(xr_ref, w_ref, s_ref, lut_ref, *refs):
        refs = list(refs)
        sg_ref = refs.pop(0) if has_signs else None
        ha_ref, hb_ref, o_ref, xs_ref = refs
        r0 = pl.program_id(0) * mp  # this column block's own copy: rows [j Mp, (j + 1) Mp)
        s = pl.program_id(1)
        b_first = (s * (steps * bku)) // xb
        rows = lax.broadcasted_iota(jnp.int32, (mp, 1), 0)
        ha, hb = ha_ref[...], hb_ref[...]
        f32_in = xr_ref.dtype == jnp.float32
        for t in range(nblk):
            b = jnp.minimum(b_first + t, nb - 1)
            cols = b * h + lax.broadcasted_iota(jnp.int32, (1, h), 1)
            x = _compat.load(
                xr_ref.at[pl.ds(0, mp), pl.ds(b * h, h)],
                mask=((rows < m) & (cols < k)) if mask else None,
                other=0,
            )
            if sg_ref is not None:
                x = x * sg_ref[:, pl.ds(b * h, h)].astype(x.dtype)  # +-1: exact
            y = _rotate.rotate_window(
                x, ha, hb, h=h, xb=xb, bm=mp, f32_in=f32_in,
                f32_out=xs_ref.dtype == jnp.float32,
            )
            xs_ref[pl.ds(r0, mp), b, 0, :, :] = y.reshape(mp, 32, xb).astype(xs_ref.dtype)
        _compat.block_barrier(interpret=interpret)
        body(xs_ref, w_ref, s_ref, lut_ref, o_ref)

    return kernel
