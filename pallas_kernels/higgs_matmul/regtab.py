"""Register-table decoding of 1-D (p = 1) grid codes with PTX byte permutes ("regtab" decoder).

Glossary: cb = code bits (2, 3 or 4), n = 2^cb grid points, word = one uint32 of the kernel
layout (`repack`), prmt = the PTX byte-permute instruction: ``prmt.b32 d, a, b, c`` builds d
from four of the eight bytes of (a, b), byte k of d chosen by nibble k of c (low 3 bits: which
byte; bit 3 set: replicate that byte's sign bit into all 8 bits instead).

Why: the gather decoders read the grid from a table in memory, and at M = 1 those lookups were
what bound the kernel on an H100 (docs/KERNELS.md, sessions 2 and 5). Here the table lives in
registers. A float32 grid value is four bytes; its top byte (sign + exponent) and its second
byte (exponent LSB + 7 mantissa bits) — the bfloat16 part — come from two byte tables of n
entries, looked up four codes at a time with one prmt each (8 entries = two registers = one
prmt; 16 entries: a table of 8 magnitudes plus the sign, below). One more prmt per code places
those bytes into a float32: bytes (lo, lo, lo, hi). The low 16 bits are copies of ``lo``
rather than zeros (a prmt has no zero source), so the value the kernel multiplies is
`effective_grid`, chosen per code as the closest such float to the grid point: within 2^-8
relative, the size of bfloat16 rounding (`gather_pair` rounds its tables to bfloat16 too).

Code layouts read (kernel layout of `repack`, one unit = 32 codes of one column):
- cb = 2: word t, field s (bits 2s..2s+1) = code 16 t + s. Selectors: ``w & 0x33333333`` puts the
  even codes in nibbles, ``(w >> 2) & 0x33333333`` the odd ones.
- cb = 4: word t, nibble s = code 8 t + s. The grid is symmetric, in one of two code orders
  (`grid_order`): "signmag" (what `repack` writes since session 7: g[8 + i] = -g[i] = the i-th
  smallest magnitude), where the magnitude index is ``c & 7`` (one mask for eight codes), or
  "sorted" (ascending, g[c] = -g[15 - c]), where it is ``(c ^ 7 * (1 - bit3)) & 7`` (six ops for
  eight codes). Either way bit 3 is the sign (0 = negative), and the sign byte comes from a prmt
  in sign mode.
- cb = 3: words 0 and 1 hold the low two bits of codes 0..15 and 16..31 (2-bit fields as for
  cb = 2) and word 2 holds bit 2 of every code at `BIT2_POSITION` [code], arranged so that one
  shift and one mask move the high bits of eight selector nibbles into place at once (`repack`
  writes this layout for every 3-bit code; the other decoders read it too).

Each program is a short list of 32-bit ops (`Op`) run by both `ptx` (inline PTX for the GPU) and
`emulate` (jax.numpy, for `interpret=True`), so the CPU tests execute the same bit manipulations
the GPU does. The byte tables are operands of the program (`table_words`, in that order), not
immediates: the kernel loads them once from its table operand before the loop. With immediates,
ptxas kept the constants in uniform registers and copied them into ordinary registers before
every use: 0.5-0.7 extra SASS instructions per weight (Triton 3.6, sm_90; session 7).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

#: Code widths (p = 1) the register-table decoder handles.
CODE_BITS = (2, 3, 4)


class Op(NamedTuple):
    """One 32-bit op: ``dst = op(srcs)``; a src is a register name or an int immediate."""

    op: str  # "and" | "or" | "xor" | "shl" | "shr" | "not" | "mul" | "prmt" | "mov"
    dst: str
    srcs: tuple


class Program(NamedTuple):
    """Inputs ``w0..w{k-1}`` (uint32 words) and the byte tables ``tables`` (register names with
    their values, passed as operands after the words) -> ``outputs[j]`` (float32 bit patterns).

    cb = 3 programs read two words (word r, word 2); both halves use the same tables.
    """

    n_words: int
    ops: tuple[Op, ...]
    outputs: tuple[str, ...]  # register of the value of code j of the words' codes (see below)
    tables: tuple[tuple[str, int], ...] = ()


# ------------------------------------------------------------------------------------ tables
def _f32_bits(v: float) -> int:
    return int(np.asarray(v, np.float32).view(np.uint32))


def _from_bits(b: int) -> float:
    return float(np.asarray(b & 0xFFFFFFFF, np.uint32).view(np.float32))


def _lolo(hi: int, lo: int) -> int:
    """The float32 bit pattern bytes (lo, lo, lo, hi) (byte 0 first)."""
    return (hi << 24) | (lo << 16) | (lo << 8) | lo


def byte_pair(v: float) -> tuple[int, int]:
    """(hi, lo) bytes whose (lo, lo, lo, hi) float32 is closest to v (ties: the smaller)."""
    top = _f32_bits(v) >> 16
    best = None
    for cand in (top - 1, top, top + 1):
        if not 0 <= cand <= 0xFFFF:
            continue
        hi, lo = cand >> 8, cand & 0xFF
        val = _from_bits(_lolo(hi, lo))
        if not np.isfinite(val) or np.sign(val) != np.sign(v) and v != 0:
            continue
        err = abs(val - v)
        if best is None or err < best[0]:
            best = (err, hi, lo)
    return best[1], best[2]


def _grid_1d(grid_values) -> np.ndarray:
    g = np.asarray([v[0] if isinstance(v, (tuple, list)) else v for v in grid_values], np.float64)
    return g


def grid_order(grid_values) -> str | None:
    """ "sorted" (ascending and g[n-1-c] = -g[c]), "signmag" (g[n/2 + i] = -g[i] > 0, ascending in
    i) or None: the two code orders of a symmetric 1-D grid the decoders understand."""
    g = _grid_1d(grid_values)
    n = g.size
    if n < 2 or n % 2:
        return None
    tol = 1e-6 * np.abs(g).max()
    if np.all(np.diff(g) > 0) and np.allclose(g[::-1], -g, rtol=0, atol=tol):
        return "sorted"
    pos = g[n // 2 :]
    if pos[0] > 0 and np.all(np.diff(pos) > 0) and np.allclose(g[: n // 2], -pos, rtol=0, atol=tol):
        return "signmag"
    return None


def _check_grid(g: np.ndarray) -> int:
    n = g.size
    cb = int(n).bit_length() - 1
    if cb not in CODE_BITS or n != 1 << cb:
        raise ValueError(f"register tables need a 1-D grid of 4, 8 or 16 points, got n={n}")
    if cb == 4 and grid_order(g) is None:
        raise ValueError(
            "the 16-point register table needs a grid symmetric about 0, sorted "
            "(g[15 - c] = -g[c]) or in sign/magnitude order (g[8 + i] = -g[i] > 0), as the "
            "Lloyd-Max Gaussian grids are"
        )
    return cb


def _magnitudes(g: np.ndarray) -> np.ndarray:
    """The n/2 positive levels of a symmetric grid (either order), ascending."""
    return g[g.size // 2 :]


def effective_grid(grid_values) -> np.ndarray:
    """float32 (n,) values the regtab decoder produces for codes 0..n-1 (see module doc)."""
    g = _grid_1d(grid_values)
    cb = _check_grid(g)
    if cb == 4:
        mags = [byte_pair(v) for v in _magnitudes(g)]
        out = [_from_bits(_lolo(h, lo)) for h, lo in mags]
        neg = (
            [-out[c] for c in range(8)]
            if grid_order(g) == "signmag"
            else [-out[7 - c] for c in range(8)]
        )
        return np.asarray(neg + out, np.float32)
    return np.asarray([_from_bits(_lolo(*byte_pair(v))) for v in g], np.float32)


def _pack_bytes(bs) -> int:
    return sum(int(b) << (8 * i) for i, b in enumerate(bs))


def _value_selector(i: int) -> int:
    """prmt selector taking bytes (lo_i, lo_i, lo_i, hi_i) from (lo4, hi4): lo4 = a, hi4 = b."""
    return i | (i << 4) | (i << 8) | ((4 + i) << 12)


# ------------------------------------------------------------------------------------ programs
@functools.cache
def _program_cached(grid_key: tuple[float, ...], half: int) -> Program:
    g = np.asarray(grid_key, np.float64)
    cb = _check_grid(g)
    if half not in ((0, 1) if cb == 3 else (0,)):
        raise ValueError(f"half={half!r}: 3-bit codes have halves 0 and 1, other widths only 0")
    ops: list[Op] = []

    def emit(op, dst, *srcs):
        ops.append(Op(op, dst, tuple(srcs)))

    def group(sel: str, tabs: tuple[str, str, str, str], sign_src: str | None, tag: str):
        """Four codes: selector nibbles in ``sel`` -> four float registers."""
        h0, h1, l0, l1 = tabs
        emit("prmt", f"h{tag}", h0, h1, sel)
        emit("prmt", f"l{tag}", l0, l1, sel)
        hi = f"h{tag}"
        if sign_src is not None:  # cb = 4: 0x80 into the hi byte of negative codes
            emit("prmt", f"g{tag}", "k7f", "k7f", sign_src)  # 0x7f (bit3 = 0) or 0x00
            emit("shl", f"g{tag}", f"g{tag}", 1)
            emit("and", f"g{tag}", f"g{tag}", 0x80808080)
            emit("or", f"hs{tag}", hi, f"g{tag}")
            hi = f"hs{tag}"
        outs = []
        for i in range(4):
            emit("prmt", f"v{tag}{i}", f"l{tag}", hi, _value_selector(i))
            outs.append(f"v{tag}{i}")
        return outs

    table_regs: list[tuple[str, int]] = []

    def tables(hb, lb, *extra):
        """Byte tables (4 entries: one register each; 8: two) -> the (h0, h1, l0, l1) names."""
        if len(hb) == 4:
            regs, tabs = (("th", hb), ("tl", lb)), ("th", "th", "tl", "tl")
        else:
            regs = (("th0", hb[:4]), ("th1", hb[4:]), ("tl0", lb[:4]), ("tl1", lb[4:]))
            tabs = ("th0", "th1", "tl0", "tl1")
        table_regs.extend((name, _pack_bytes(val)) for name, val in regs)
        table_regs.extend(extra)
        return tabs

    def even_odd(e: str, o: str, tabs) -> tuple[str, ...]:
        """Selectors ``e`` (nibble i: code 2i) and ``o`` (code 2i + 1) of 16 codes -> 16 values."""
        emit("shr", f"{e}h", e, 16)
        emit("shr", f"{o}h", o, 16)
        vals = {}
        for sel, first, tag in ((e, 0, "a"), (f"{e}h", 8, "b"), (o, 1, "c"), (f"{o}h", 9, "d")):
            for i, reg in enumerate(group(sel, tabs, None, tag)):
                vals[first + 2 * i] = reg
        return tuple(vals[c] for c in range(16))

    if cb == 4:
        pairs = [byte_pair(v) for v in _magnitudes(g)]  # magnitudes, ascending
        tabs = tables([h for h, _ in pairs], [lo for _, lo in pairs], ("k7f", 0x7F7F7F7F))
        if grid_order(g) == "signmag":  # magnitude index per nibble: c & 7
            emit("and", "ix", "w0", 0x77777777)
        else:  # sorted: c & 7 if bit3 else 7 - c = (c ^ 7) & 7
            emit("not", "nw", "w0")
            emit("shr", "nb", "nw", 3)
            emit("and", "nb", "nb", 0x11111111)
            emit("mul", "t7", "nb", 7)
            emit("xor", "ix", "w0", "t7")
            emit("and", "ix", "ix", 0x77777777)
        emit("shr", "ixh", "ix", 16)
        emit("shr", "wh", "w0", 16)
        outputs = group("ix", tabs, "w0", "a") + group("ixh", tabs, "wh", "b")
        return Program(1, tuple(ops), tuple(outputs), tuple(table_regs))

    pairs = [byte_pair(v) for v in g]
    tabs = tables([h for h, _ in pairs], [lo for _, lo in pairs])
    if cb == 2:
        emit("and", "se", "w0", 0x33333333)  # nibble i: code 2i
        emit("shr", "so", "w0", 2)
        emit("and", "so", "so", 0x33333333)  # nibble i: code 2i + 1
        outputs = even_odd("se", "so", tabs)
        return Program(1, tuple(ops), outputs, tuple(table_regs))

    # cb == 3, half r: words w0 = word r of the unit (low two bits of codes 16 r .. 16 r + 15),
    # w1 = word 2 (bit 2 of every code, at BIT2_POSITION); bit 2 of the even / odd codes moved
    # to 4 i + 2 (nibble i's high selector bit)
    if half == 0:  # codes 2i at bit 4i + 2, codes 2i + 1 at bit 4i + 3
        emit("and", "qe", "w1", 0x44444444)
        emit("shr", "qo", "w1", 1)
    else:  # codes 16 + 2i at bit 4i, codes 17 + 2i at bit 4i + 1
        emit("shl", "qe", "w1", 2)
        emit("and", "qe", "qe", 0x44444444)
        emit("shl", "qo", "w1", 1)
    emit("and", "qo", "qo", 0x44444444)
    emit("and", "e", "w0", 0x33333333)
    emit("or", "e", "e", "qe")  # nibble i: code 2i of the half
    emit("shr", "o", "w0", 2)
    emit("and", "o", "o", 0x33333333)
    emit("or", "o", "o", "qo")  # nibble i: code 2i + 1
    outputs = even_odd("e", "o", tabs)
    return Program(2, tuple(ops), outputs, tuple(table_regs))


def table_words(grid_values) -> tuple[int, ...]:
    """uint32 values of the table operands every program of this grid reads, in operand order
    (the kernel's table input; `decode_words` takes them in this order)."""
    return tuple(v for _, v in program(grid_values).tables)


def program(grid_values, half: int = 0) -> Program:
    """The decode program of a 1-D grid with 4, 8 or 16 points.

    Inputs and outputs (``outputs[j]``: value of code j of the inputs, in the kernel layout):
    cb = 2: word t -> codes 16 t + j (16); cb = 4: word t -> codes 8 t + j (8); cb = 3, half r:
    (word r, word 2) of a unit -> codes 16 r + j (16).
    """
    g = _grid_1d(grid_values)
    _check_grid(g)
    return _program_cached(tuple(float(v) for v in g), int(half))


# ------------------------------------------------------------------------------------ backends
def ptx(prog: Program) -> tuple[str, str]:
    """(inline PTX text, constraint string) for `_compat.inline_asm`: outputs $0.. (f32),
    inputs after them (the words, then the tables, as b32)."""
    n_out = len(prog.outputs)
    names: dict[str, str] = {f"w{i}": f"${n_out + i}" for i in range(prog.n_words)}
    for i, (name, _) in enumerate(prog.tables):
        names[name] = f"${n_out + prog.n_words + i}"
    out_of = {r: j for j, r in enumerate(prog.outputs)}
    regs: list[str] = []
    for op in prog.ops:
        if op.dst not in names and op.dst not in regs:
            regs.append(op.dst)

    def src(s):
        if isinstance(s, int):
            return hex(s & 0xFFFFFFFF)
        return names.get(s, f"r_{s}")

    lines = []
    for op in prog.ops:
        d = f"r_{op.dst}"
        a = [src(s) for s in op.srcs]
        if op.op in ("and", "or", "xor"):
            lines.append(f"{op.op}.b32 {d}, {a[0]}, {a[1]};")
        elif op.op in ("shl", "shr"):
            lines.append(f"{op.op}.b32 {d}, {a[0]}, {op.srcs[1]};")
        elif op.op == "not":
            lines.append(f"not.b32 {d}, {a[0]};")
        elif op.op == "mul":
            lines.append(f"mul.lo.u32 {d}, {a[0]}, {a[1]};")
        elif op.op == "mov":
            lines.append(f"mov.b32 {d}, {a[0]};")
        elif op.op == "prmt":
            lines.append(f"prmt.b32 {d}, {a[0]}, {a[1]}, {a[2]};")
        else:  # pragma: no cover - programs are built above
            raise ValueError(f"unknown op {op.op!r}")
    for r, j in out_of.items():
        lines.append(f"mov.b32 ${j}, r_{r};")
    decl = "{ .reg .b32 " + ", ".join(f"r_{r}" for r in regs) + ";"
    text = decl + " " + " ".join(lines) + " }"
    constraints = ",".join(["=f"] * n_out + ["r"] * (prog.n_words + len(prog.tables)))
    return text, constraints


def _prmt(a, b, c):
    """jnp emulation of ``prmt.b32`` (default mode): uint32 arrays or Python ints."""
    import jax.numpy as jnp

    a = jnp.asarray(a, jnp.uint32)
    b = jnp.asarray(b, jnp.uint32)
    c = jnp.asarray(c, jnp.uint32)
    out = jnp.zeros(jnp.broadcast_shapes(a.shape, b.shape, c.shape), jnp.uint32)
    for k in range(4):
        nib = (c >> np.uint32(4 * k)) & np.uint32(0xF)
        idx = nib & np.uint32(7)
        sh = (idx & np.uint32(3)) * np.uint32(8)
        byte = jnp.where(idx < np.uint32(4), a >> sh, b >> sh) & np.uint32(0xFF)
        neg = (byte >> np.uint32(7)) != np.uint32(0)
        rep = jnp.where(neg, np.uint32(0xFF), np.uint32(0))
        byte = jnp.where((nib & np.uint32(8)) != np.uint32(0), rep, byte)
        out = out | (byte << np.uint32(8 * k))
    return out


def emulate(prog: Program, words, tables=None) -> list:
    """Runs the program with jax.numpy: ``words`` (uint32 arrays, one per input) and ``tables``
    (uint32 scalars or arrays in `table_words` order; default: the program's own values) ->
    float32 arrays, one per output (interpret mode; the same ops the PTX runs)."""
    import jax.numpy as jnp
    from jax import lax

    env = {f"w{i}": jnp.asarray(w, jnp.uint32) for i, w in enumerate(words)}
    if tables is None:
        tables = [v for _, v in prog.tables]
    if len(tables) != len(prog.tables):
        raise ValueError(f"program reads {len(prog.tables)} tables, got {len(tables)}")
    for (name, _), t in zip(prog.tables, tables):
        env[name] = jnp.asarray(t, jnp.uint32)

    def val(s):
        return np.uint32(s & 0xFFFFFFFF) if isinstance(s, int) else env[s]

    for op in prog.ops:
        a = [val(s) for s in op.srcs]
        if op.op == "and":
            r = a[0] & a[1]
        elif op.op == "or":
            r = a[0] | a[1]
        elif op.op == "xor":
            r = a[0] ^ a[1]
        elif op.op == "shl":
            r = a[0] << np.uint32(op.srcs[1])
        elif op.op == "shr":
            r = a[0] >> np.uint32(op.srcs[1])
        elif op.op == "not":
            r = ~a[0]
        elif op.op == "mul":
            r = a[0] * a[1]
        elif op.op == "mov":
            r = a[0]
        elif op.op == "prmt":
            r = _prmt(a[0], a[1], a[2])
        else:  # pragma: no cover
            raise ValueError(f"unknown op {op.op!r}")
        env[op.dst] = jnp.asarray(r, jnp.uint32)
    return [lax.bitcast_convert_type(env[r], jnp.float32) for r in prog.outputs]


def instruction_count(prog: Program) -> int:
    """PTX ops per program run (the tables are operands, loaded once per kernel)."""
    return sum(1 for op in prog.ops if op.op != "mov")


def decode_words(prog: Program, words: list, tables: list, *, interpret: bool) -> list:
    """Kernel-side entry: (BKU, BN) uint32 word tiles and the table values (`table_words`
    order; uint32 scalars loaded once by the kernel) -> float32 value tiles, one per code.

    GPU: one inline-PTX block per element (`_compat.inline_asm`); ``interpret``: `emulate`.
    """
    if len(words) != prog.n_words:
        raise ValueError(f"program reads {prog.n_words} words, got {len(words)}")
    if len(tables) != len(prog.tables):
        raise ValueError(f"program reads {len(prog.tables)} tables, got {len(tables)}")
    if interpret:
        return emulate(prog, words, tables)
    import jax.numpy as jnp

    from pallas_kernels import _compat

    text, constraints = ptx(prog)
    shape = tuple(words[0].shape)
    args = list(words) + [jnp.broadcast_to(t, shape) for t in tables]
    return _compat.inline_asm(text, constraints, args, [jnp.float32] * len(prog.outputs), shape)


def jobs(grid_values, code_bits: int) -> list[tuple[Program, tuple[int, ...], int]]:
    """(program, word rows it reads, first code index) covering the 32 codes of a unit."""
    if code_bits not in CODE_BITS:
        raise ValueError(f"regtab decodes code_bits in {CODE_BITS}, got {code_bits}")
    if code_bits == 3:
        return [(program(grid_values, r), (r, 2), 16 * r) for r in (0, 1)]
    per = 32 // code_bits
    return [(program(grid_values), (t,), per * t) for t in range(code_bits)]
