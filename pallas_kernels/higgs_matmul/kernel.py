"""Pallas (Triton backend) kernel body: y_partial = x_rot · decode(words) · scales.

Glossary: M = rows of x (padded to a power of two), K = rotated, padded contraction dim,
N = columns, p = grid dimension, n = grid points, cb = code bits, unit = 32 consecutive codes of
one column (cb uint32 words, see `repack`), BKU = units per loop step, BN = columns per program,
BM = rows of x per program, S = split_k (programs along K), plane c = the c-th code (0..31) of
every unit in a tile, slot = one dot operand of the wide path (a coordinate d < p, or for p = 1
pair decoding the even/odd code of a pair).

Grid: (N / BN, S, M / BM). Program (j, s, i) owns columns [j BN, (j+1) BN) and the units
[s * steps * BKU, (s+1) * steps * BKU); it loops over `steps` tiles of BKU units, extracts the
codes with a shift and a mask per part (no straddling in the kernel layout), decodes them to
grid values without a memory lookup where possible, and multiplies with the matching
activations (permuted in the wrapper, so every slice the kernel reads is contiguous).

Three paths:
- "fma" (M <= 8): plane by plane; activations in the blocked layout x[m, b, d, c, u] =
  x_rot[m, (32 (b XB + u) + c) p + d] (`x_plane`; XB units per block); CUDA-core multiply-adds into per-row accumulators of shape (BKU, BN); the scale multiplies once
  per (tile, row) rather than per weight; reduced over rows at the end.
- "dot": plane by plane (same activation layout); the decoded plane (BKU, BN) is cast to the
  activation dtype and fed to a tensor-core dot with the (BM, BKU) activation plane (32 p dots
  of K = BKU per step), each dot carrying the running f32 sum as its accumulator
  (`_compat.dot_acc`). Scales: per weight before the cast, or with ``tile_scale`` (a tile inside
  one scale group) once per (tile, column) on the tile's chained sum.
- "wide" (any M, meant for M >= 2): the whole tile at once. Each code part is loaded as one
  (BKU, w, BN) word block and unpacked with a broadcast shift to (BKU, 32, BN) (entry [u, c, n]
  = code 32 (u0 + u) + c); all codes are decoded and scaled together, and each slot e is one dot
  of K = BKU * 32 / q: (BM, K) activations x (K, BN) decoded weights (K order: unit major, code
  minor). Activations x[m, e, u * 32/q + c'] with q = 2 for p = 1 pair decoding (slot e = code
  parity, c' = pair index: x_rot[m, 32 u + 2 c' + e]) and q = 1 otherwise (slot e = coordinate
  d: x_rot[m, (32 u + c') p + d]).
Partial sums (S, M, N) are reduced outside the kernel (wrapper).

Decoders on the fma and dot paths: per plane (extract a code, then select / poly / gather /
gather_pair), or "regtab" (p = 1): one inline-PTX block per code word decodes all its codes from
register byte tables (`regtab.py`) and the multiply-adds consume them plane by plane.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.higgs_matmul import pairdec as _pairdec
from pallas_kernels.higgs_matmul import regtab as _regtab
from pallas_kernels.higgs_matmul.repack import code_parts, part_shifts

_MAGIC = np.uint32(
    0x4B000000
)  # float 2^23: OR-ing an integer j < 2^23 into its mantissa gives 2^23 + j


# ------------------------------------------------------------------------------------ decoders
def symmetric_magnitudes(grid_values) -> np.ndarray | None:
    """The n/2 positive levels (ascending) if the 1-D grid is symmetric, in sorted order
    (g[n-1-i] = -g[i]) or in sign/magnitude order (g[n/2 + i] = -g[i] > 0; `regtab.grid_order`)."""
    if len(grid_values[0]) != 1 or _regtab.grid_order(grid_values) is None:
        return None
    g = np.asarray([v[0] for v in grid_values], np.float64)
    return g[g.size // 2 :]


def magnitude_poly(mags: np.ndarray) -> tuple[float, ...]:
    """Coefficients (low degree first) of the polynomial through (j - (m-1)/2, mags[j]), j < m.

    Centering the abscissae keeps the Vandermonde system well conditioned: for the 16-level
    Lloyd-Max grid the float32 Horner evaluation reproduces the levels to ~1e-7 relative.
    """
    m = mags.size
    u = np.arange(m, dtype=np.float64) - (m - 1) / 2
    coef = np.linalg.solve(np.vander(u, m, increasing=True), mags)
    return tuple(float(c) for c in coef)


def _decode_poly(code, *, cb: int, coef: tuple[float, ...], mirrored: bool = True):
    """Sign/magnitude decode of a symmetric 1-D grid: a few integer ops + (m-1) FMAs.

    ``mirrored``: sorted grid order (codes below m are the mirrored negatives); else the
    sign/magnitude order (`regtab.grid_order`), where the low bits are the magnitude index."""
    m = 1 << (cb - 1)
    low = code & np.uint32(m - 1)
    neg = (code >> np.uint32(cb - 1)) == np.uint32(0)
    # Sorted order: magnitude index of a negative code is m-1-low == low ^ (m-1).
    j = jnp.where(neg, low ^ np.uint32(m - 1), low) if mirrored else low
    # Integer -> float via the mantissa trick (full-rate ALU ops instead of the slow I2F unit):
    # u2 = 2 j - (m - 1) is an odd integer, so one exact subtraction centres it (a half-integer
    # centre would need two subtractions that compilers may re-associate into an inexact one).
    u = lax.bitcast_convert_type((j << np.uint32(1)) | _MAGIC, jnp.float32) - np.float32(
        8388608.0 + (m - 1)
    )
    coef = tuple(c / 2.0**k for k, c in enumerate(coef))  # polynomial in u2 = 2 u
    acc = u * np.float32(coef[-1]) + np.float32(coef[-2])  # m >= 2 levels: degree >= 1
    for c in coef[-3::-1]:
        acc = acc * u + np.float32(c)
    return jnp.where(neg, -acc, acc)


def _decode_select(code, *, cb: int, values: tuple[float, ...]):
    """Binary select tree on the code bits with the grid values compiled in (n - 1 selects)."""
    level = [np.float32(v) for v in values]
    bit = 0
    while len(level) > 1:
        is_one = (code & np.uint32(1 << bit)) != np.uint32(0)
        level = [jnp.where(is_one, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
        bit += 1
    out = level[0]
    if not isinstance(out, jax.Array):
        out = jnp.full(code.shape, out, jnp.float32)
    return out


def pair_words(idx, lut_ref, p: int):
    """The p / 2 uint32 words of bf16 coordinate pairs of codes ``idx`` (table: `wrapper._lut`)."""
    if p == 2:
        return [lut_ref[idx]]
    base = idx * (p // 2)
    return [lut_ref[base + j] for j in range(p // 2)]


def decode_codes(code, lut_ref, *, decode: str, cb: int, p: int, grid_values, coef):
    """Codes (uint32, any shape) -> list of p float32 arrays of grid coordinates."""
    if decode == "poly":
        mirrored = _regtab.grid_order(grid_values) != "signmag"
        return [_decode_poly(code, cb=cb, coef=coef, mirrored=mirrored)]
    if decode == "select":
        return [
            _decode_select(code, cb=cb, values=tuple(v[d] for v in grid_values)) for d in range(p)
        ]
    idx = code.astype(jnp.int32)
    if decode == "gather":
        if p == 1:
            return [lut_ref[idx]]
        return [lut_ref[idx * p + d] for d in range(p)]
    if decode == "gather_pair":
        # One 32-bit load returns two coordinates as bf16 (low half: even, high half: odd);
        # bf16 -> f32 is a 16-bit shift of the bit pattern. p = 4: two loads per code.
        out = []
        for pair in pair_words(idx, lut_ref, p):
            out.append(lax.bitcast_convert_type(pair << np.uint32(16), jnp.float32))
            out.append(lax.bitcast_convert_type(pair & np.uint32(0xFFFF0000), jnp.float32))
        return out
    raise ValueError(f"unknown decode {decode!r}")


# ------------------------------------------------------------------------------------ activations
def x_plane(x_ref, rows, d: int, c: int, u0, *, bku: int, xblk: int):
    """Activations of plane c, coordinate d for the tile of units [u0, u0 + BKU).

    ``x_ref`` is in the blocked layout (Mp, NB, p, 32, XB): entry [m, b, d, c, u] is the rotated
    activation of weight row (32 (b XB + u) + c) p + d, so a block of XB units holds, per
    (coordinate, plane), XB contiguous values (XB = units per Hadamard block when the wrapper
    rotates with a matmul, see `wrapper.kernel_activations`). ``rows`` selects x rows (an int or
    a `pl.ds`). Returns (BKU,) for an int ``rows``, else (len(rows), BKU).
    """
    if bku <= xblk:  # xblk is a multiple of BKU: the tile sits inside one block
        b = u0 // xblk
        off = u0 - b * xblk
        return x_ref[rows, b, d, c, pl.ds(off, bku)]
    r = bku // xblk  # the tile spans r whole blocks
    v = x_ref[rows, pl.ds(u0 // xblk, r), d, c, :]
    return v.reshape(v.shape[:-2] + (bku,))


# ------------------------------------------------------------------------------------ tiles
def tile_mask(
    rows, cols, *, bku: int, bn: int, units: int, n_cols: int, mask_rows: bool, mask_cols: bool
):
    """(BKU, BN) bool mask of the valid words of a tile (unit rows ``rows``, columns ``cols``),
    or None when the tile can never reach past the weight (both flags False)."""
    mask = None
    if mask_rows:
        mask = jnp.broadcast_to(rows[:, None] < units, (bku, bn))
    if mask_cols:
        cm = jnp.broadcast_to(cols < n_cols, (bku, bn))
        mask = cm if mask is None else mask & cm
    return mask


def tile_mask_and_scales(
    s_ref,
    rows,
    cols,
    *,
    bku: int,
    bn: int,
    units: int,
    n_cols: int,
    group_units_num: int,
    group_units_den: int,
    num_groups: int,
    mask_rows: bool,
    mask_cols: bool,
):
    """(mask or None, f32 scales) of a (BKU, BN) tile: unit rows ``rows``, columns ``cols``.

    Shared by both kernels. A unit never spans two scale groups, so one scale row per unit row.
    """
    mask = tile_mask(
        rows,
        cols,
        bku=bku,
        bn=bn,
        units=units,
        n_cols=n_cols,
        mask_rows=mask_rows,
        mask_cols=mask_cols,
    )
    g_idx = (rows * group_units_num) // group_units_den
    if mask_rows:
        g_idx = jnp.minimum(g_idx, num_groups - 1)
    # Two broadcast index arrays (not array + slice): one form both Triton and interpret mode
    # lower; the column index is contiguous, so the load stays coalesced.
    g2 = jnp.broadcast_to(g_idx[:, None], (bku, bn))
    c2 = jnp.broadcast_to(cols, (bku, bn))
    if mask_cols:
        c2 = jnp.minimum(c2, n_cols - 1)
    scl = _compat.load(s_ref.at[g2, c2], mask=mask, other=0).astype(jnp.float32)
    return mask, scl


def wide_codes(w_ref, u0, n0, mask, *, bku: int, bn: int, cb: int, pair: bool):
    """All codes of a (BKU units, BN columns) tile at once: (BKU, 32 / q, BN) uint32.

    Entry [u, c, n] is code ``32 (u0 + u) + c`` of column ``n0 + n`` (q = 1), or with ``pair``
    (one part of width w, q = 2) the 2w-bit field holding codes ``2c`` (low bits) and ``2c + 1``
    of the unit. Each part (width w, word rows [r0, r0 + w)) is one (BKU, w, BN) masked load;
    its fields are spread over a new axis by one broadcast shift, (BKU, w, 32/(qw), BN), and the
    row-major merge of the (w, 32/(qw)) axes is the code order of the kernel layout (`repack`).
    No slicing of loaded values and only power-of-two shapes (Triton).

    Args:
      w_ref: (U, cb, N) uint32 kernel-layout words.
      u0, n0: first unit row and first column of the tile (traced int32 scalars).
      mask: (BKU, BN) bool tile mask from `tile_mask_and_scales`, or None (unmasked).
      bku, bn, cb: tile sizes and code bits.
      pair: extract 2w-bit pair fields (p = 1 pair decoding; cb must be one part).
    """
    parts = code_parts(cb)
    if pair and len(parts) != 1:
        raise ValueError(f"pair extraction needs a single-part code width, got cb={cb}")
    code = None
    row0 = offset = 0
    for w in parts:
        m3 = None if mask is None else jnp.broadcast_to(mask[:, None, :], (bku, w, bn))
        ref = w_ref.at[pl.ds(u0, bku), pl.ds(row0, w), pl.ds(n0, bn)]
        words = _compat.load(ref, mask=m3, other=0)  # (BKU, w, BN)
        fw = 2 * w if pair else w
        per = 32 // fw  # fields per word
        slot = lax.broadcasted_iota(jnp.int32, (1, 1, per, 1), 2).astype(jnp.uint32)
        if cb == 3 and w == 1:
            # bit 2 of code s sits at repack.bit2_position(s) = 4 ((s & 15) >> 1) + 2 - 2 (s >> 4)
            # + (s & 1), i.e. 2 (s & 14) + 2 (1 - (s >> 4)) + (s & 1)
            shift = (
                (slot & np.uint32(14)) * np.uint32(2)
                + (np.uint32(1) - (slot >> np.uint32(4))) * np.uint32(2)
                + (slot & np.uint32(1))
            )
        else:
            shift = slot * np.uint32(fw)
        field = (words.reshape(bku, w, 1, bn) >> shift) & np.uint32((1 << fw) - 1)
        field = field.reshape(bku, w * per, bn)
        code = field if code is None else code | (field << np.uint32(offset))
        row0 += w
        offset += w
    return code


# ------------------------------------------------------------------------------------ kernel
def _wide_tile_dot(
    x_ref, w_ref, lut_ref, u0, n0, i, mask, scl, *, decode, p, cb, grid_values, coef, bku, bn, bm
):
    """One loop step of the wide path: (BM, BN) f32 contribution of a (BKU, BN) word tile."""
    pair = decode == "gather_pair" and p == 1
    q = 2 if pair else 1
    code = wide_codes(w_ref, u0, n0, mask, bku=bku, bn=bn, cb=cb, pair=pair)
    if pair:
        # 2w-bit pair fields index the n*n table of bf16 pairs: slot 0 = even, 1 = odd codes.
        vals = decode_codes(code, lut_ref, decode=decode, cb=2 * cb, p=2, grid_values=(), coef=())
    else:
        vals = decode_codes(
            code, lut_ref, decode=decode, cb=cb, p=p, grid_values=grid_values, coef=coef
        )
    k = bku * 32 // q
    scl3 = scl[:, None, :]  # (BKU, 1, BN): one scale per (unit row, column)
    k0 = pl.multiple_of(u0 * (32 // q), k)
    acc = None
    for e, v in enumerate(vals):
        xs = x_ref[pl.ds(i * bm, bm), e, pl.ds(k0, k)]  # (BM, K), contiguous
        wv = (v * scl3).astype(xs.dtype).reshape(k, bn)  # K order: unit major, code minor
        part = jnp.dot(xs, wv, preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    return acc


def tile_line_offsets(u0, n0, *, bku: int, cb: int, bn: int, units: int, n_cols: int):
    """Flat offsets into the (units, cb, n_cols) words of one word per 128-byte line of the tile
    of units [u0, u0 + BKU) and columns [n0, n0 + BN): int32 (R, max(1, BN / 32)), R = BKU cb
    rounded up to a power of two (the extra rows repeat the tile's last word row).

    Rows and columns past the array's end are clamped to its last row / column, so every offset
    stays inside the array (a clamped line is a repeat, never another weight's memory)."""
    rows = bku * cb
    shape = (1 << (rows - 1).bit_length(), max(1, bn // 32))  # Triton tensors: powers of two
    r = jnp.minimum(lax.broadcasted_iota(jnp.int32, shape, 0), rows - 1)  # 3-bit: 48 -> 64 rows
    col = n0 + 32 * lax.broadcasted_iota(jnp.int32, shape, 1)
    row = jnp.minimum(u0 * cb + r, units * cb - 1)
    return row * n_cols + jnp.minimum(col, n_cols - 1)


def higgs_matmul_kernel(
    x_ref,  # (Mp, NB, p, 32, XB) f32 (fma) / activation dtype (dot), or (Mp, p q, 32 U_x / q) (wide)
    w_ref,  # (U, cb, N) uint32: kernel-layout codes
    s_ref,  # (G, N) scales
    lut_ref,  # (L,) f32 / uint32 lookup table (only read by the gather decoders)
    o_ref,  # (S, Mp, N_out) f32 partial sums
    *,
    path: str,
    decode: str,
    p: int,
    cb: int,
    grid_values,
    coef,
    units: int,
    bku: int,
    bn: int,
    bm: int,
    steps: int,
    n_cols: int,
    group_units_num: int,
    group_units_den: int,
    num_groups: int,
    m_rows: int,
    mask_rows: bool,
    mask_cols: bool,
    xblk: int,
    words: str = "lazy",
    fused_fma: bool = False,
    tile_scale: bool = False,
    swap_dot: bool = False,
    mma_m: int = 0,
    prefetch: int = 0,
    x_rows_per_column_block: int = 0,
    interpret: bool = False,
):
    """Kernel body; see the module docstring. Plane-path options (`Config`):

    x_rows_per_column_block: "fma" path: 0, or the program of column block j reads x rows
      [j R, j R + M) (R this value): each column block's own copy of the activations, which
      `fused.py` writes in the kernel's prologue.

    words: when the weight words of a tile are loaded. "lazy": each word row right before the
      first plane that needs it (one DRAM round trip per word row, in series). "eager": all cb
      word rows at the top of the loop step, before any decoding (cb loads in flight at once).
      "prefetch": eager, plus the next tile's word rows are issued at the top of each step and
      carried to the next one (their latency overlaps this step's decoding).
    fused_fma: "fma" path: multiply-adds as inline-PTX fused multiply-adds (XLA's Triton pipeline
      emits a separate FMUL and FADD otherwise); with the bf16-pair decoder, the pair unpacking
      and both products are one PTX block. ``interpret`` swaps in the same arithmetic in jnp.
    tile_scale: "dot" path, only when every tile lies inside one scale group (the group size in
      units is a multiple of BKU; the wrapper decides): the planes' dots chain into one unscaled
      (BM, BN) tile sum, scaled once per (tile, column), instead of scaling every decoded weight.
    swap_dot: "dot" path (`Config.dot_order` "wx"): each plane's dot is the transposed product
      (BN, BKU) weights x (BKU, BM) activations into a (BN, BM) sum, transposed at the store.
    mma_m: "dot" path (`Config.mma_m`): rows of x per tensor-core dot; the program's BM rows are
      BM / mma_m dots that share each decoded plane, each with its own running sum. 0: BM.
    prefetch: "fma"/"dot" paths (`Config.prefetch`): at each loop step, ask for the word tile
      this many steps ahead to be brought into L2 (`_compat.prefetch_l2`, one PTX prefetch per
      128-byte line; tiles 0 .. prefetch-1 before the loop). Past the program's last
      tile it re-prefetches that tile, so no other program's words are touched. 0: off.
    """
    mm = mma_m or bm
    if path == "dot" and (bm % mm or mm < 16):
        raise ValueError(f"mma_m={mma_m} must be >= 16 and divide block_m={bm}")
    nsub = bm // mm if path == "dot" else 1
    j = pl.program_id(0)
    s = pl.program_id(1)
    i = pl.program_id(2)  # read here: interpret mode cannot lower program_id inside the loop
    x_row0 = j * x_rows_per_column_block if x_rows_per_column_block else 0
    n0 = pl.multiple_of(j * bn, bn)
    cols = n0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    parts = code_parts(cb)
    mask_kw = {
        "bku": bku,
        "bn": bn,
        "units": units,
        "n_cols": n_cols,
        "mask_rows": mask_rows,
        "mask_cols": mask_cols,
    }

    def load_word(u0, t, mask):  # word row t of the tile of units [u0, u0 + BKU): (BKU, BN)
        ref = w_ref.at[pl.ds(u0, bku), jnp.int32(t), pl.ds(n0, bn)]
        return _compat.load(ref, mask=mask, other=0)

    def load_words(u0, mask):
        return tuple(load_word(u0, t, mask) for t in range(cb))

    def first_unit(it):
        return pl.multiple_of((s * steps + it) * bku, bku)

    def unit_rows(u0):
        return u0 + lax.broadcasted_iota(jnp.int32, (bku,), 0)

    def prefetch_tile(it_ahead):  # L2 prefetch of the word tile of loop step it_ahead
        u_pf = first_unit(jnp.minimum(it_ahead, steps - 1))
        offsets = tile_line_offsets(u_pf, n0, bku=bku, cb=cb, bn=bn, units=units, n_cols=n_cols)
        _compat.prefetch_l2(w_ref, offsets, interpret=interpret)

    def step(it, carry):
        state, ahead = carry
        u0 = first_unit(it)
        rows = unit_rows(u0)
        if prefetch and path != "wide":
            prefetch_tile(it + prefetch)
        if words == "prefetch" and path != "wide":
            # Issue the next tile's loads first; off the end of this program's range they are
            # masked off entirely (no memory traffic).
            u1 = u0 + bku
            m1 = tile_mask(unit_rows(u1), cols, **mask_kw)
            live = jnp.broadcast_to(it + 1 < steps, (bku, bn))
            nxt = load_words(u1, live if m1 is None else (m1 & live))
        else:
            nxt = ahead
        if tile_scale:
            # The whole tile sits in scale group g: one (1, BN) scale row, applied after the dots.
            mask = tile_mask(rows, cols, **mask_kw)
            g = jnp.minimum((u0 * group_units_num) // group_units_den, num_groups - 1)
            c1 = jnp.minimum(cols, n_cols - 1) if mask_cols else cols
            g1 = jnp.broadcast_to(g, (1, bn))
            cm = (cols < n_cols) if mask_cols else None
            scl = _compat.load(s_ref.at[g1, c1], mask=cm, other=0).astype(jnp.float32)
        else:
            mask, scl = tile_mask_and_scales(
                s_ref,
                rows,
                cols,
                group_units_num=group_units_num,
                group_units_den=group_units_den,
                num_groups=num_groups,
                **mask_kw,
            )
        if path == "wide":
            return state + _wide_tile_dot(
                x_ref,
                w_ref,
                lut_ref,
                u0,
                n0,
                i,
                mask,
                scl,
                decode=decode,
                p=p,
                cb=cb,
                grid_values=grid_values,
                coef=coef,
                bku=bku,
                bn=bn,
                bm=bm,
            ), ahead
        loaded = {}
        if words == "prefetch":
            loaded = dict(enumerate(ahead))
        elif words == "eager":
            loaded = dict(enumerate(load_words(u0, mask)))

        def word(t):
            if t not in loaded:
                loaded[t] = load_word(u0, t, mask)
            return loaded[t]

        def xrow(m, d, c):  # (BKU, BN) f32 broadcast of one activation plane (fma path)
            xs = x_plane(x_ref, x_row0 + m, d, c, u0, bku=bku, xblk=xblk).astype(jnp.float32)
            return jnp.broadcast_to(xs[:, None], (bku, bn))

        if path == "fma":
            partial = [jnp.zeros((bku, bn), jnp.float32) for _ in range(m_rows)]
        else:
            acc = state
        pair1 = decode == "gather_pair" and p == 1
        fused_pair = fused_fma and path == "fma" and decode == "gather_pair"
        # dot path: the running sum the planes' dots accumulate into (their accumulator operand,
        # `_compat.dot_acc`): the program's (BM, BN) sum, or with tile_scale this tile's
        # unscaled sum.
        acc_shape = (bn, mm) if swap_dot else (mm, bn)
        if path == "fma":
            dot_acc = [None]
        elif tile_scale:
            dot_acc = [jnp.zeros(acc_shape, jnp.float32) for _ in range(nsub)]
        else:
            dot_acc = list(acc)

        def consume(vals, slots):  # decoded (BKU, BN) values of (coordinate, plane) slots
            for v, (d, cc) in zip(vals, slots):
                if path == "fma":
                    for m in range(m_rows):
                        if fused_fma:
                            partial[m] = _compat.fma_f32(
                                xrow(m, d, cc), v, partial[m], interpret=interpret
                            )
                        else:
                            xs = x_plane(x_ref, x_row0 + m, d, cc, u0, bku=bku, xblk=xblk)
                            partial[m] = partial[m] + xs.astype(jnp.float32)[:, None] * v
                else:
                    wv = None
                    for r in range(nsub):  # sub-blocks of mm rows share the decoded plane
                        rows_x = pl.ds(i * bm + r * mm, mm)
                        xs = x_plane(x_ref, rows_x, d, cc, u0, bku=bku, xblk=xblk)
                        if wv is None:
                            wv = (v if tile_scale else v * scl).astype(xs.dtype)  # (BKU, BN)
                        if swap_dot:
                            dot_acc[r] = _compat.dot_acc(
                                wv.T, xs.T, dot_acc[r], interpret=interpret
                            )
                        else:
                            dot_acc[r] = _compat.dot_acc(xs, wv, dot_acc[r], interpret=interpret)

        if decode == "regpair":
            # Pair decoding (pairdec.py): one unary PTX block per plane and two weights, straight
            # to the activation dtype, so Triton feeds the MMA from registers (no shared-memory
            # round trip of the decoded plane).
            if path != "dot" or not tile_scale:
                raise ValueError("decode='regpair' needs the dot path with tile_scale")
            dt = jnp.dtype(x_ref.dtype).name
            per = 32 // cb
            for t in range(cb):
                wt = word(t)
                for f in range(per):
                    if interpret:
                        v = _pairdec.emulate(wt, grid_values, cb, f, dt)
                    else:
                        text = _pairdec.ptx(grid_values, cb, f, dt)
                        v = _compat.unary_pair_asm(wt, text, x_ref.dtype)
                    consume([v], ((0, t * per + f),))
            planes = range(0)
        elif decode == "regtab":
            # Register tables (regtab.py): one inline-PTX block per word (two for 3-bit codes)
            # decodes all its codes with byte permutes; no memory lookups.
            for prog, rows_t, first in _regtab.jobs(grid_values, cb):
                vals = _regtab.decode_words(
                    prog, [word(t) for t in rows_t], reg_tables, interpret=interpret
                )
                consume(vals, tuple((0, first + j) for j in range(len(vals))))
            planes = range(0)
        else:
            planes = range(0, 32, 2 if pair1 else 1)
        for c in planes:
            code = None
            row0, offset = 0, 0
            for w, shifts in zip(parts, part_shifts(cb)):
                fw = 2 * w if pair1 else w  # p = 1 pairs: codes c, c+1 of one word, one field
                cpw = 32 // w
                field = (word(row0 + c // cpw) >> np.uint32(shifts[c % cpw])) & np.uint32(
                    (1 << fw) - 1
                )
                code = field if code is None else code | (field << np.uint32(offset))
                row0 += w
                offset += w
            if fused_pair:
                # One 32-bit gather = two bf16 grid values; unpack + two FMAs in one PTX block.
                idx = code.astype(jnp.int32)
                if pair1:
                    jobs = [(lut_ref[idx], (0, c), (0, c + 1))]
                else:
                    words_p = pair_words(idx, lut_ref, p)
                    jobs = [(wp, (2 * j, c), (2 * j + 1, c)) for j, wp in enumerate(words_p)]
                for pair, da, db in jobs:
                    for m in range(m_rows):
                        partial[m] = _compat.bf16_pair_fma(
                            pair, xrow(m, *da), xrow(m, *db), partial[m], interpret=interpret
                        )
                continue
            if pair1:
                vals = decode_codes(
                    code, lut_ref, decode=decode, cb=2 * cb, p=2, grid_values=(), coef=()
                )
                slots = ((0, c), (0, c + 1))  # (coordinate, plane) of each decoded value
            else:
                vals = decode_codes(
                    code, lut_ref, decode=decode, cb=cb, p=p, grid_values=grid_values, coef=coef
                )
                slots = tuple((d, c) for d in range(p))
            consume(vals, slots)
        if path == "fma":
            return tuple(state[m] + partial[m] * scl for m in range(m_rows)), nxt
        if tile_scale:
            sc = scl.T if swap_dot else scl
            return tuple(state[r] + dot_acc[r] * sc for r in range(nsub)), nxt
        return tuple(dot_acc), nxt

    # regtab: the byte tables (`regtab.table_words`, the table operand) are read once, before the
    # loop, so they stay in registers (as PTX immediates they were re-materialised at every use).
    reg_tables = (
        [lut_ref[t] for t in range(len(_regtab.table_words(grid_values)))]
        if decode == "regtab"
        else []
    )
    if prefetch and path != "wide":
        # Tiles 0 .. prefetch-1 before the loop (with "lazy" words, tile 0's later word rows
        # are then L2 hits too); step `it` asks for tile it + prefetch.
        for ahead_step in range(prefetch):
            prefetch_tile(jnp.int32(ahead_step))
    if words == "prefetch" and path != "wide":
        u_first = first_unit(0)
        m0 = tile_mask(unit_rows(u_first), cols, **mask_kw)
        ahead0 = load_words(u_first, m0)
    else:
        ahead0 = ()
    if path == "fma":
        init = tuple(jnp.zeros((bku, bn), jnp.float32) for _ in range(m_rows))
        out, _ = lax.fori_loop(0, steps, step, (init, ahead0))
        for m in range(m_rows):
            o_ref[s, m, pl.ds(n0, bn)] = jnp.sum(out[m], axis=0)
    elif path == "wide":
        out, _ = lax.fori_loop(0, steps, step, (jnp.zeros((bm, bn), jnp.float32), ahead0))
        o_ref[s, pl.ds(i * bm, bm), pl.ds(n0, bn)] = out
    else:
        acc0 = tuple(
            jnp.zeros((bn, mm) if swap_dot else (mm, bn), jnp.float32) for _ in range(nsub)
        )
        out, _ = lax.fori_loop(0, steps, step, (acc0, ahead0))
        for r in range(nsub):
            o_ref[s, pl.ds(i * bm + r * mm, mm), pl.ds(n0, bn)] = out[r].T if swap_dot else out[r]
