"""The "nk16" weight layout and its pair decoder: p = 1 codes read as (columns, units) tiles of
uint16 and decoded two weights per PTX block straight into the tensor-core operand registers.

Glossary: cb = code bits (2 or 4), unit = 32 consecutive codes of one column, plane c = the c-th
code of every unit (c < 32), pair word = the 32 bits of two uint16 entries of adjacent units
(2i, 2i + 1) of one column and one row, F = 16 / cb planes per row, R = 2 cb rows.

Why this layout. On the "dot" path Triton keeps a decoded plane in the MMA's registers only when
the chain load -> single-operand elementwise ops -> dot has no layout change in between (Triton's
HoistLayoutConversion / MMAV3HoistLayoutConversion; docs/KERNELS.md sessions 9-10). The
warpgroup MMA of Hopper takes only its *first* operand from registers, so the decoded weights
must be that operand: a (BN, BKU) tile, columns x units. With the kernel layout of `repack`
(U, cb, N) such a tile needs a transpose after the load, which stops the hoisting; here the
words are stored columns-major, ``words[r, n, u]``, so the tile is a plain load. (Checked
offline with Triton 3.6 for sm_90: ``HGMMA.64xMx16`` with the decoded weights in registers.)
Since session 12 the kernel can also transpose the loaded word tile and feed the decoded plane
to warp-level MMAs as their second operand (``dot_order="xw"``, `kernel_nk`), which avoids the
warpgroup MMA's wait per plane; either way the pairs are adjacent units.

Layout: rows ``words[r, n, u]`` (U even) of uint16, stored in blocks of 16 units,
``stored[u // 16, r, n, u % 16]`` (`block` / `unblock`): one loop step's (BN, 16) tile of a row
is one contiguous run of BN x 32 bytes, and a step's 2 cb rows are adjacent. (Session 12: the
unblocked (R, N, U) order read 32 contiguous bytes per column and row, and the 4-bit kernel ran
at 138 us against 94 us with 256-byte runs, 8192x28672, M = 16, H100.) Row r holds planes
``r F .. r F + F - 1``. The pair
word ``P = words[r, n, 2i] | words[r, n, 2i + 1] << 16`` holds those planes' codes of units A = 2i
and B = 2i + 1 in the bit positions below, chosen so that one shift (or rotate) per plane puts
both codes where the byte permutes want them:

- cb = 2, plane f: shift s_f = 2 f (f < 4) or 16 + 2 (f - 4); after ``t = P >> s_f`` code A is
  bits 0-1 and code B bits 8-9. Decode: ``m = t & 0x0303``; ``sel = m * 0x11 + 0x4040`` (selector
  nibbles A, A + 4, B, B + 4); ``out = prmt(LO, HI, sel)`` with the four low bytes and the four
  high bytes of the 16-bit grid values as the two table registers: (lo_A, hi_A, lo_B, hi_B) are
  the two values. Three integer-pipe ops and one multiply-add per two weights.
- cb = 4 (16-point grids in sign/magnitude order, `regtab.grid_order` "signmag", decoded to
  bfloat16): nibble 2 f + j of P is the code of plane f of unit A (j = 0) or B (j = 1), stored as
  is (bit 3 = 1 for the positive half, bits 0-2 the magnitude index m). A bfloat16's low byte
  (exponent LSB + 7 mantissa bits) depends only on |v|, its high byte (sign + 7 exponent bits) on
  the sign and on which of [2^-3, 2^-1), [2^-1, 2), [2, 8), ... holds |v|. For the Gaussian
  16-point grid the magnitudes pair up: m = 2k and 2k + 1 lie in one such range (`check` tests
  it), so the high byte is a function of the three bits (sign, m2, m1), i.e. of ``c >> 1``. Both
  byte tables have eight entries, one prmt each looks up four codes: with
  ``a = P & 0x77777777`` (low-byte selectors) and ``b = (P >> 1) & 0x77777777`` (high-byte
  selectors), planes 0 and 1 read the low halves, planes 2 and 3 the high halves (``>> 16``);
  ``l = prmt(LO, a)``, ``h = prmt(HI, b)``, and one interleaving prmt per plane,
  (l0, h0, l1, h1) or (l2, h2, l3, h3), gives the plane's two values. Each plane's PTX block
  repeats the shared ops; ptxas merges them, so a pair word costs 13 integer-pipe ops for its
  eight weights (session 13; the session-12 plan with rotations and a sign OR took 6 per two).
  Sessions 11-12 stored signs and magnitudes at rotated positions (`PLAN4`, removed), for
  float16 too; the high-byte table has no float16 form (its high byte holds two mantissa bits).

Values are the grid rounded to the activation dtype (bf16 or f16, nearest even), so `emulate`
(interpret mode, the same op list run by jax.numpy) reproduces the GPU bit for bit.
"""

from __future__ import annotations

import functools
import numpy as np

from pallas_kernels.higgs_matmul import pairdec as _pairdec
from pallas_kernels.higgs_matmul import regtab as _regtab
from pallas_kernels.higgs_matmul.regtab import Op

CODE_BITS = (2, 4)
DTYPES = ("bfloat16", "float16")
LAYOUT = "nk16"
#: Units per block of the stored layout: the "nk" path reads one block per loop step.
BLOCK_UNITS = 16

#: cb = 4: selector mask of the eight nibbles (bit 3 of a prmt selector nibble means "sign
#: mode", so it is cleared).
NIBBLE_MASK = 0x77777777
#: cb = 4, plane f: the interleaving prmt's selector, (lo, hi, lo, hi) of the plane's two codes.
INTERLEAVE4 = (0x5140, 0x7362, 0x5140, 0x7362)
#: cb = 2: per plane f, the right shift that brings its two codes to bits 0-1 and 8-9.
SHIFTS2 = (0, 2, 4, 6, 16, 18, 20, 22)


def planes_per_row(cb: int) -> int:
    if cb not in CODE_BITS:
        raise ValueError(f"the nk16 layout holds 2- and 4-bit codes, got {cb}-bit codes")
    return 16 // cb


def _positions(cb: int, f: int) -> tuple[list[int], list[int]]:
    """Bit positions in the pair word P of plane f's code A and code B (low bit first)."""
    if cb == 2:
        s = SHIFTS2[f]
        return [s, s + 1], [s + 8, s + 9]
    na, nb = 4 * (2 * f), 4 * (2 * f + 1)
    return list(range(na, na + 4)), list(range(nb, nb + 4))


# ------------------------------------------------------------------------------------ packing
def block(words):
    """Rows ``uint16[R, N, U]`` (U a multiple of `BLOCK_UNITS`) -> stored ``[U / 16, R, N, 16]``."""
    R, ncols, units = words.shape
    if units % BLOCK_UNITS:
        raise ValueError(f"nk16 stores whole blocks of {BLOCK_UNITS} units, got {units} units")
    return words.reshape(R, ncols, units // BLOCK_UNITS, BLOCK_UNITS).transpose(2, 0, 1, 3)


def unblock(stored):
    """Stored ``[U / 16, R, N, 16]`` -> rows ``[R, N, U]`` (inverse of `block`)."""
    nb, R, ncols, bu = stored.shape
    if bu != BLOCK_UNITS:
        raise ValueError(f"nk16 blocks hold {BLOCK_UNITS} units, got {bu}")
    return stored.transpose(1, 2, 0, 3).reshape(R, ncols, nb * bu)


def pack_pair_words(codes, cb: int):
    """Integer codes (32 U, N), U a multiple of 16, in the grid order of the weight (4-bit:
    sign/magnitude) -> ``uint16[U / 16, 2 cb, N, 16]``, the stored nk16 layout (jax.numpy; run
    once at load time)."""
    import jax.numpy as jnp

    F = planes_per_row(cb)
    kc, ncols = codes.shape
    if kc % (32 * BLOCK_UNITS):
        raise ValueError(
            f"nk16 packs whole blocks of {BLOCK_UNITS} units: codes need a multiple of "
            f"{32 * BLOCK_UNITS} k rows, got {kc}"
        )
    units = kc // 32
    c = codes.astype(jnp.uint32).reshape(units // 2, 2, 32, ncols)  # (pair, A/B, plane, col)
    rows = []
    for r in range(2 * cb):
        word = jnp.zeros((units // 2, ncols), jnp.uint32)
        for f in range(F):
            plane = r * F + f
            pa, pb = _positions(cb, f)
            for pos, code in ((pa, c[:, 0, plane]), (pb, c[:, 1, plane])):
                for i, place in enumerate(pos):
                    word = word | (((code >> i) & 1) << np.uint32(place))
        lo = (word & 0xFFFF).astype(jnp.uint16)
        hi = (word >> 16).astype(jnp.uint16)
        rows.append(jnp.stack([lo, hi], axis=1).reshape(units, ncols).T)  # (N, U)
    return block(jnp.stack(rows))


def unpack_pair_words(stored, cb: int):
    """Inverse of `pack_pair_words`: ``uint16[U / 16, 2 cb, N, 16]`` -> int32 codes (32 U, N)."""
    import jax.numpy as jnp

    F = planes_per_row(cb)
    words = unblock(stored)
    R, ncols, units = words.shape
    w = words.astype(jnp.uint32)
    pair = w[:, :, 0::2] | (w[:, :, 1::2] << 16)  # (R, N, U/2)
    out = jnp.zeros((units // 2, 2, 32, ncols), jnp.uint32)
    for r in range(R):
        for f in range(F):
            pa, pb = _positions(cb, f)
            for ab, pos in ((0, pa), (1, pb)):
                v = sum(((pair[r] >> np.uint32(p)) & 1) << i for i, p in enumerate(pos))
                out = out.at[:, ab, r * F + f, :].set(v.T)
    return out.reshape(units * 32, ncols).astype(jnp.int32)


# ------------------------------------------------------------------------------------ decoding
def check(grid_values, cb: int) -> None:
    """Raises ValueError unless the nk16 decoder handles this grid and code width."""
    planes_per_row(cb)
    g = _regtab._grid_1d(grid_values)
    if g.size != 1 << cb:
        raise ValueError(f"nk16: a {cb}-bit code needs {1 << cb} grid points, got {g.size}")
    if cb == 4:
        if _regtab.grid_order(grid_values) != "signmag":
            raise ValueError(
                "nk16 needs a 16-point grid in sign/magnitude order (g[8 + i] = -g[i] > 0), got "
                f"order {_regtab.grid_order(grid_values)!r}"
            )
        bits = _pairdec.table_values(grid_values, cb, "bfloat16").astype(np.int64) >> 8
        for k in range(4):
            if bits[8 + 2 * k] != bits[8 + 2 * k + 1]:
                raise ValueError(
                    "nk16 4-bit decoding needs magnitudes 2k and 2k + 1 to share a bfloat16 "
                    f"high byte (one binade pair [2^(2j-1), 2^(2j+1))); magnitudes {2 * k} and "
                    f"{2 * k + 1} of this grid, {g[8 + 2 * k]:.6g} and {g[8 + 2 * k + 1]:.6g}, "
                    "do not"
                )


def table_values(grid_values, cb: int, dtype: str) -> np.ndarray:
    """(2^cb,) uint32: the 16-bit pattern each code decodes to (the pair decoder's values,
    `pairdec.table_values`: the grid rounded to ``dtype``)."""
    check(grid_values, cb)
    return _pairdec.table_values(grid_values, cb, dtype)


def byte_tables4(grid_values) -> tuple[list[int], list[int]]:
    """cb = 4: the eight low bytes (index m, the magnitude) and eight high bytes (index
    ``c >> 1`` = (sign bit, m2, m1)) of the bfloat16 grid values."""
    bits = [int(b) for b in table_values(grid_values, 4, "bfloat16")]
    lo = [bits[8 + m] & 0xFF for m in range(8)]
    hi = [bits[2 * j] >> 8 for j in range(8)]  # code 2j and 2j + 1 share it (`check`)
    return lo, hi


@functools.lru_cache(maxsize=256)
def _program_cached(key: tuple[float, ...], cb: int, f: int, dtype: str) -> tuple[Op, ...]:
    grid = tuple((v,) for v in key)
    ops: list[Op] = []
    emit = lambda op, dst, *srcs: ops.append(Op(op, dst, srcs))
    pack = _regtab._pack_bytes
    if cb == 2:
        bits = table_values(grid, cb, dtype)
        lo, hi = pack([b & 0xFF for b in bits]), pack([b >> 8 for b in bits])
        src = "P"
        if SHIFTS2[f]:
            emit("shr", "t", "P", SHIFTS2[f])
            src = "t"
        emit("and", "m", src, 0x0303)
        emit("mad", "m", "m", 0x11, 0x4040)  # selector nibbles (A, A + 4, B, B + 4)
        emit("prmt", "out", lo, hi, "m")
        return tuple(ops)
    lo, hi = byte_tables4(grid)
    # the same first ops in every plane's block: ptxas computes them once per pair word
    emit("and", "a", "P", NIBBLE_MASK)
    emit("shr", "t", "P", 1)
    emit("and", "b", "t", NIBBLE_MASK)
    sa, sb = "a", "b"
    if f >= 2:
        emit("shr", "a2", "a", 16)
        emit("shr", "b2", "b", 16)
        sa, sb = "a2", "b2"
    emit("prmt", "l", pack(lo[:4]), pack(lo[4:]), sa)
    emit("prmt", "h", pack(hi[:4]), pack(hi[4:]), sb)
    emit("prmt", "out", "l", "h", INTERLEAVE4[f])
    return tuple(ops)


def program(grid_values, cb: int, field: int, dtype: str = "bfloat16") -> tuple[Op, ...]:
    """The op list decoding plane ``field`` of a pair word into two 16-bit values (``out``)."""
    check(grid_values, cb)
    if not 0 <= field < planes_per_row(cb):
        raise ValueError(
            f"field must be in [0, {planes_per_row(cb)}) for {cb}-bit codes, got {field}"
        )
    if dtype not in DTYPES:
        raise ValueError(f"nk16 decoding produces one of {DTYPES}, got {dtype!r}")
    if cb == 4 and dtype != "bfloat16":
        raise ValueError(
            f"nk16 4-bit codes decode to bfloat16 only (the high-byte table has no {dtype} "
            "form); pass bfloat16 activations or keep the weight in the default layout"
        )
    key = tuple(float(v) for v in _regtab._grid_1d(grid_values))
    return _program_cached(key, cb, field, dtype)


def ptx(grid_values, cb: int, field: int, dtype: str = "bfloat16") -> str:
    """Unary inline PTX: ``$1`` = the pair word (two uint16 of adjacent units), ``$0`` = two
    16-bit values, unit A's in the low half."""
    ops = program(grid_values, cb, field, dtype)
    regs = sorted({op.dst for op in ops} - {"out"})

    def src(v):
        if isinstance(v, str):
            return "$1" if v == "P" else f"r_{v}"
        return f"{v & 0xFFFFFFFF:#x}"

    lines = []
    for op in ops:
        d = "$0" if op.dst == "out" else f"r_{op.dst}"
        a = [src(v) for v in op.srcs]
        if op.op == "rotr":
            lines.append(f"shf.r.wrap.b32 {d}, {a[0]}, {a[0]}, {op.srcs[1]};")
        elif op.op == "shr":
            lines.append(f"shr.b32 {d}, {a[0]}, {op.srcs[1]};")
        elif op.op in ("and", "or"):
            lines.append(f"{op.op}.b32 {d}, {a[0]}, {a[1]};")
        elif op.op == "mad":
            lines.append(f"mad.lo.u32 {d}, {a[0]}, {a[1]}, {a[2]};")
        elif op.op == "prmt":
            lines.append(f"prmt.b32 {d}, {a[0]}, {a[1]}, {a[2]};")
        else:  # pragma: no cover - programs are built above
            raise ValueError(f"unknown op {op.op!r}")
    return "{ .reg .b32 " + ", ".join(f"r_{r}" for r in regs) + "; " + " ".join(lines) + " }"


def emulate_pairs(pair, grid_values, cb: int, field: int, dtype: str = "bfloat16"):
    """Runs the op list with jax.numpy on uint32 pair words -> uint32 (two 16-bit values each)."""
    import jax.numpy as jnp

    env = {"P": jnp.asarray(pair, jnp.uint32)}
    val = lambda v: env[v] if isinstance(v, str) else np.uint32(v & 0xFFFFFFFF)
    for op in program(grid_values, cb, field, dtype):
        a = [val(v) for v in op.srcs]
        if op.op == "rotr":
            k = np.uint32(op.srcs[1])
            r = (a[0] >> k) | (a[0] << np.uint32(32 - op.srcs[1]))
        elif op.op == "shr":
            r = a[0] >> np.uint32(op.srcs[1])
        elif op.op == "and":
            r = a[0] & a[1]
        elif op.op == "or":
            r = a[0] | a[1]
        elif op.op == "mad":
            r = a[0] * a[1] + a[2]
        elif op.op == "prmt":
            r = _regtab._prmt(a[0], a[1], a[2])
        else:  # pragma: no cover
            raise ValueError(f"unknown op {op.op!r}")
        env[op.dst] = jnp.asarray(r, jnp.uint32)
    return env["out"]


def emulate(tile, grid_values, cb: int, field: int, dtype: str = "bfloat16"):
    """Interpret-mode twin of the GPU decode: a (BN, BKU) uint16 tile of one row -> (BN, BKU)
    values of plane ``field`` in ``dtype``; columns 2i and 2i + 1 form the pair words."""
    import jax.numpy as jnp
    from jax import lax

    t = tile.astype(jnp.uint32)
    bn, bku = tile.shape
    pair = t[:, 0::2] | (t[:, 1::2] << np.uint32(16))
    out = emulate_pairs(pair, grid_values, cb, field, dtype)  # (BN, BKU / 2)
    halves = jnp.stack([out & np.uint32(0xFFFF), out >> np.uint32(16)], axis=-1)
    return lax.bitcast_convert_type(halves.reshape(bn, bku).astype(jnp.uint16), getattr(jnp, dtype))


def decode(tile, grid_values, cb: int, field: int, dtype, *, interpret: bool, pair_axis: int = 1):
    """Kernel-side entry: uint16 tile -> plane ``field`` in ``dtype``, same shape (one unary
    pack-2 PTX block per two weights on the GPU; `emulate` in interpret mode). ``pair_axis``: the
    axis along which adjacent entries (2i, 2i + 1) form the pair words, 1 for a (BN, BKU) tile,
    0 for its transpose (BKU, BN). On the GPU the pairs are whatever two elements are adjacent in
    a thread's registers; the dot's operand layout (k pairs per register) makes them units
    2i, 2i + 1 either way, which the GPU tests check against the reference."""
    import jax.numpy as jnp

    if pair_axis not in (0, 1):
        raise ValueError(f"pair_axis must be 0 or 1, got {pair_axis!r}")
    name = jnp.dtype(dtype).name
    if interpret:
        if pair_axis == 0:
            return emulate(tile.T, grid_values, cb, field, name).T
        return emulate(tile, grid_values, cb, field, name)
    from pallas_kernels import _compat

    return _compat.unary_pair_asm(tile, ptx(grid_values, cb, field, name), dtype)
