"""The activation rotation as one Pallas kernel (``Config.rotation = "kernel"``).

The matmul kernels read the rotated activations in the blocked layout of
`wrapper.kernel_activations`: entry [m, b, c, u] = x_rot[m, b h + 32 u + c] for p = 1 (XB = h / 32
units per Hadamard block of h coordinates). By default XLA builds it with one matmul per block
(`rotation_matrix`, a dense (h, h) +-1 matrix); on an H100 that is a Triton GEMM with split-K plus
one or two elementwise fusions (3–7 µs at M = 1–16, `benchmarks/op_profile.py`).

This kernel does the same in one launch, with the Sylvester structure instead of the dense
matrix. With the local index r = 32 u + c, H_h = H_XB ⊗ H_32 (H[i, j] = (-1)^popcount(i & j)),
so for a block viewed as X[u', c'] (XB x 32):

    Y = H_XB X H_32,   Y[u, c] = x_rot[32 u + c] (unnormalised),

and the kernel's order (c, u) is Y transposed. Program (b, i) loads rows [i BM, (i + 1) BM) of
Hadamard block b (zero beyond M and K), multiplies by the random signs, and computes

1. Z = X H_32: one (BM XB, 32) x (32, 32) dot (exact +-1 operands, f32 accumulation; bf16/f16
   activations run on tensor cores, f32 ones as an f32 FMA dot);
2. Y^T = Z^T-blocks x H_XB: Z transposed to (BM, 32, XB) and one (BM 32, XB) x (XB, XB) dot
   of the f32 sums: an f32 FMA dot (``precision=HIGHEST``, no tf32 rounding) for an f32
   output, two bf16 tensor-core dots of Z = hi + lo (relative error 2^-16) for a 16-bit one;

then scales by 1 / sqrt(h) and stores (BM, h) in the activation dtype of the matmul kernel.
Cost per block row: 32 + XB multiply-adds per coordinate, against h for the dense matrix.

With ``norm`` = (scale, eps) the kernel rotates ``rms_norm(x)`` instead (the model's pre-norm
before q/k/v, gate/up and the lm_head, `higgs_jax.norms`): each program also reads the other
windows of its rows for the sum of squares (a loop over the row's blocks; from L2 after the first
program), so XLA's two norm kernels (the reduction and the scaling) are not launched. It is
used with ``Config.norm = "kernel"`` only: in the 32-layer decode on an H100 (session 16) it
measured 1-2% slower than XLA's norm kernels.

Scope: p = 1 and power-of-two h with 16 <= XB <= 64 (h = 512 ... 2048; the dots need K, N >= 16);
`supported` says what is missing, and the wrapper keeps the XLA route otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat

#: Rows of x per program: at M = 16, K = 8192 (16 blocks of 512) 16 rows per program made 16
#: programs (4.4 us on an H100, session 15); 4 rows make 64.
ROWS_PER_PROGRAM = 4
#: Windows of a row the fused RMSNorm reads with unrolled loads (a loop beyond).
MAX_UNROLLED_NORM_BLOCKS = 32
#: Hadamard sizes the kernel handles (p = 1): XB = h / 32 units per block, 16..64.
MIN_H, MAX_H = 512, 2048


def supported(p: int, h: int) -> tuple[bool, str]:
    """(ok, reason) for rotating activations of a p-dim grid with Hadamard size ``h``."""
    if p != 1:
        return False, f"p={p} (the rotation kernel handles p = 1)"
    if h & (h - 1) or not MIN_H <= h <= MAX_H:
        return False, (
            f"hadamard_size={h} (the rotation kernel needs a power of two in [{MIN_H}, {MAX_H}])"
        )
    return True, "ok"


@functools.lru_cache(maxsize=None)
def sylvester(n: int) -> np.ndarray:
    """(n, n) float32 Sylvester Hadamard matrix, natural order: H[i, j] = (-1)^popcount(i & j)."""
    i = np.arange(n)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return np.where(parity == 1, -1.0, 1.0).astype(np.float32)


def needs_mask(m: int, k: int, rows: int, blocks: int, h: int) -> bool:
    """Whether the (bm, h) windows of x run past x (rows beyond M, coordinates beyond K): then
    the load is masked and those entries read as zero, as the XLA route's padding makes them."""
    return rows != m or blocks * h != k


def rotate_window(x, ha, hb, *, h: int, xb: int, bm: int, f32_in: bool, f32_out: bool):
    """Inside a kernel: the (bm, h) window ``x`` (signs applied) -> (bm 32, xb) float32, row
    (row, c), column u = x_rot[row, 32 u + c] (normalised). ``ha``/``hb``: H_32 and H_XB as
    float32 values. Steps 1 and 2 of the module docstring; also the prologue of the matmul
    kernel with ``Config.rotation = "fused"`` (`fused.py`)."""
    prec = lax.Precision.HIGHEST
    z = jnp.dot(
        x.reshape(bm * xb, 32), ha.astype(x.dtype),
        precision=prec if f32_in else None, preferred_element_type=jnp.float32,
    )  # (BM XB, 32): Z[(row, u'), c] = sum_c' X[row, u', c'] H_32[c', c]
    zt = jnp.transpose(z.reshape(bm, xb, 32), (0, 2, 1)).reshape(bm * 32, xb)
    if f32_out:
        y = jnp.dot(zt, hb, precision=prec, preferred_element_type=jnp.float32)
    else:
        # a 16-bit output: Z as a bf16 pair hi + lo (relative error 2^-16, far below the
        # output's rounding) through two tensor-core dots instead of one f32 FMA dot
        hi = zt.astype(jnp.bfloat16)
        lo = (zt - hi.astype(jnp.float32)).astype(jnp.bfloat16)
        hb = hb.astype(jnp.bfloat16)
        y = jnp.dot(hi, hb, preferred_element_type=jnp.float32)
        y = y + jnp.dot(lo, hb, preferred_element_type=jnp.float32)
    return y * np.float32(1.0 / np.sqrt(h))  # (BM 32, XB): row (row, c), column u


def _kernel(
    x_ref, s_ref, n_ref, ha_ref, hb_ref, o_ref, *, h, xb, bm, m, k, blocks, eps, mask, f32_in,
    interpret,
):
    b = pl.program_id(0)
    i = pl.program_id(1)
    rows = i * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)

    def window(j):  # (bm, h) window j of this program's rows, zero beyond M and K
        cols = j * h + lax.broadcasted_iota(jnp.int32, (1, h), 1)
        return _compat.load(
            x_ref.at[pl.ds(i * bm, bm), pl.ds(j * h, h)],
            mask=((rows < m) & (cols < k)) if mask else None,
            other=0,
        )

    x = window(b)
    if n_ref is not None:
        # RMSNorm of the whole row, as `higgs_jax.norms.rms_norm`: the squares in f32 of all
        # `blocks` windows (the other windows come from L2: every program of the row reads
        # them) summed elementwise, one reduction across the window at the end, then
        # x * rsqrt(mean + eps) * scale, rounded to x's dtype. Up to MAX_UNROLLED_NORM_BLOCKS
        # windows the loads are unrolled, so they are all in flight at once (session 16 on an
        # H100: a loop over the windows, one reduction each, cost ~5 us per norm). The window
        # starts are traced (b * 0 + j): a static window past K is refused at trace time
        # even though its load is masked.
        zero = b * 0
        acc = jnp.zeros((bm, h), jnp.float32)
        if blocks <= MAX_UNROLLED_NORM_BLOCKS:
            for j in range(blocks):
                w = window(zero + j).astype(jnp.float32)
                acc = acc + w * w
        else:
            def sum_sq(j, a):
                w = window(j).astype(jnp.float32)
                return a + w * w

            acc = lax.fori_loop(0, blocks, sum_sq, acc)
        ss = jnp.sum(acc, axis=1, keepdims=True)
        r = lax.rsqrt(ss * np.float32(1.0 / k) + np.float32(eps))
        x = ((x.astype(jnp.float32) * r) * n_ref[:, pl.ds(b * h, h)]).astype(x.dtype)
    if s_ref is not None:
        x = x * s_ref[:, pl.ds(b * h, h)].astype(x.dtype)  # +-1: exact
    y = rotate_window(
        x, ha_ref[...], hb_ref[...], h=h, xb=xb, bm=bm, f32_in=f32_in,
        f32_out=o_ref.dtype == jnp.float32,
    )
    o_ref[pl.ds(i * bm, bm), pl.ds(b * h, h)] = y.reshape(bm, h).astype(o_ref.dtype)


def rotate(
    x2: jax.Array,
    signs: jax.Array | None,
    *,
    h: int,
    rows: int,
    blocks: int,
    dtype,
    interpret: bool,
    norm: tuple[jax.Array, float] | None = None,
) -> jax.Array:
    """(M, K) activations -> (rows, blocks h) rotated activations in ``dtype``, entry
    [m, b h + c XB + u] = x_rot[m, b h + 32 u + c] (zero beyond M and K); see the module
    docstring. ``rows``: a power of two or a multiple of 16 (the matmul kernel's padded M).
    ``norm`` = (scale (K,), eps): rotate ``rms_norm(x2, scale, eps)`` instead (the norm of
    `higgs_jax.norms`, computed per row inside the kernel)."""
    ok, why = supported(1, h)
    if not ok:
        raise ValueError(f"rotation kernel: unsupported {why}")
    m, k = x2.shape
    if rows < m or blocks * h < k:
        raise ValueError(f"rotation kernel: rows={rows}, blocks={blocks} x h={h} < x {x2.shape}")
    bm = min(rows, ROWS_PER_PROGRAM)
    if rows % bm:
        raise ValueError(f"rotation kernel: rows={rows} must be a power of two or a multiple of 16")
    xb = h // 32
    f32_in = x2.dtype == jnp.float32
    if x2.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"rotation kernel: activations must be f32/bf16/f16, got {x2.dtype}")
    # the padding of x itself is masked in the kernel; the signs (short, reused) are padded here
    s = None
    if signs is not None:
        s = jnp.pad(signs[:k].astype(jnp.float32), (0, blocks * h - k)).reshape(1, blocks * h)
    ns, eps = None, 0.0
    if norm is not None:
        scale, eps = norm
        if tuple(scale.shape) != (k,) or not eps > 0:
            raise ValueError(
                f"rotation kernel: norm wants a ({k},) scale and eps > 0, got {scale.shape}, "
                f"{eps!r}"
            )
        ns = jnp.pad(scale.astype(jnp.float32), (0, blocks * h - k)).reshape(1, blocks * h)
    ha = jnp.asarray(sylvester(32))
    hb = jnp.asarray(sylvester(xb))
    body = functools.partial(
        _kernel, h=h, xb=xb, bm=bm, m=m, k=k, blocks=blocks, eps=float(eps),
        mask=needs_mask(m, k, rows, blocks, h), f32_in=f32_in, interpret=interpret,
    )
    # optional operands (signs, norm scale) are passed only when present
    present = [v is not None for v in (s, ns)]

    def body_fn(x_ref, *refs):
        refs = list(refs)
        opt = [refs.pop(0) if p else None for p in present]
        body(x_ref, *opt, *refs)

    operands = (x2, *(v for v in (s, ns) if v is not None), ha, hb)
    # x2 is read in (bm, h) windows at row i bm and column b h. On the GPU the load is masked
    # beyond M and K (masked lanes are not read), so x2 is not padded (a pad would be one more
    # launch). Interpret mode slices windows with dynamic_slice, which clamps a window that
    # runs past the end instead of masking it, so there x2 is padded to whole windows.
    if interpret and x2.shape != (rows, blocks * h):
        operands = (jnp.pad(x2, [(0, rows - m), (0, blocks * h - k)]),) + operands[1:]
    with _compat.quiet_triton_deprecation():
        return pl.pallas_call(
            body_fn,
            out_shape=jax.ShapeDtypeStruct((rows, blocks * h), dtype),
            grid=(blocks, rows // bm),
            compiler_params=None if interpret else _compat.compiler_params(4, 1),
            interpret=interpret,
            name=f"higgs_rotate_h{h}",
        )(*operands)
