"""Half-precision pair decoding for the tensor-core path ("regpair"): codes -> bf16/f16 values
that Triton can compute directly in the MMA operand's register layout.

Why a second decoder. The register-table decoder (`regtab.py`) decodes a whole code word per
inline-PTX block (several results) into f32, and the dot path then casts to bf16. Triton moves a
dot operand's layout conversion up to the operand's load ("hoisting", so the decoded values
never go through shared memory) only through chains of single-result, single-operand elementwise
ops without float/int truncation. The regtab chain fails both tests, so every plane of every tile
went through a shared-memory store, a barrier and a matrix load (session 9). Here each plane is
one *unary* PTX block from the 32-bit code word to one 16-bit value, no truncation op: the chain
load -> asm -> dot hoists, and the word tile is loaded once per step straight into the layout
the MMA wants (checked by `benchmarks/sass_count.py`: no per-plane shared-memory traffic).
Only with ``dot_order="xw"``: the transpose of the "wx" order sits between the asm and the dot
and stops the hoisting (the results are the same, the shared-memory round trip comes back).

One asm instance handles two elements (``pack=2``: two code words in, one register of two 16-bit
values out; Triton pairs elements that are adjacent in the thread's registers). For field ``s``
of a word (code bits ``cb`` in {2, 4}):

1. ``prmt`` gathers the byte holding field s of both words into bytes 0 and 1 of one register;
   a shift (odd nibble / crumb position) and a mask leave the two codes in selector nibbles 0
   and 2.
2. Two ``prmt`` look the codes up in byte tables held as immediates: the high and the low byte
   of each 16-bit value (4 entries per 32-bit table for 2-bit codes; for 4-bit codes 8 entries
   per table pair, the magnitude index, see below).
3. One ``prmt`` interleaves (low, high) bytes into the two 16-bit values.

4-bit codes use the sign/magnitude code order (`regtab.grid_order` "signmag": g[8 + i] = -g[i]):
the tables hold g[0..7] and the sign bit of codes >= 8 is flipped: the two codes' bit 3 are
masked out, moved to bits 15 and 31 with one integer multiply and XOR-ed in (``lop3``).

Values are the grid rounded to the output dtype (nearest even), so `emulate` (interpret mode)
reproduces the GPU bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np

from pallas_kernels.higgs_matmul.regtab import _grid_1d, _pack_bytes, grid_order

CODE_BITS = (2, 4)
DTYPES = ("bfloat16", "float16")


def _bits16(values: np.ndarray, dtype: str) -> np.ndarray:
    import jax.numpy as jnp

    if dtype not in DTYPES:
        raise ValueError(f"pair decoding produces one of {DTYPES}, got {dtype!r}")
    # numpy with jax's (ml_dtypes) 16-bit float types: round to nearest even, no tracing
    arr = np.asarray(values, np.float32).astype(getattr(jnp, dtype))
    return arr.view(np.uint16).astype(np.uint32)


def check(grid_values, code_bits: int) -> None:
    """Raises ValueError unless the pair decoder handles this grid and code width."""
    if code_bits not in CODE_BITS:
        raise ValueError(
            f"decode='regpair' handles 2- and 4-bit codes of p = 1 grids, got {code_bits}-bit codes"
        )
    g = _grid_1d(grid_values)
    if g.size != 1 << code_bits:
        raise ValueError(
            f"decode='regpair': a {code_bits}-bit code needs {1 << code_bits} grid points, got {g.size}"
        )
    if code_bits == 4 and grid_order(grid_values) != "signmag":
        raise ValueError(
            "decode='regpair' needs a 16-point grid in sign/magnitude order (g[8 + i] = -g[i] > 0), "
            f"got order {grid_order(grid_values)!r}"
        )


def table_values(grid_values, code_bits: int, dtype: str) -> np.ndarray:
    """(2^code_bits,) uint32: the 16-bit pattern each code decodes to (what `emulate` looks up)."""
    check(grid_values, code_bits)
    g = _grid_1d(grid_values)
    if code_bits == 2:
        return _bits16(g, dtype)
    low = _bits16(g[:8], dtype)  # codes 0..7: the tables; codes 8..15: same, sign flipped
    return np.concatenate([low, low ^ np.uint32(0x8000)])


@functools.lru_cache(maxsize=256)
def _ptx_cached(key: tuple[float, ...], code_bits: int, field: int, dtype: str) -> str:
    g = np.asarray(key, np.float64)
    bits = table_values(tuple((float(v),) for v in g), code_bits, dtype)
    rows = bits[:4] if code_bits == 2 else bits[:8]
    hi = [(int(b) >> 8) & 0xFF for b in rows]
    lo = [int(b) & 0xFF for b in rows]
    per_byte = 8 // code_bits  # fields per byte
    byte, pos = divmod(field, per_byte)
    shift = pos * code_bits
    # byte `byte` of word $1 -> out byte 0, of word $2 (source bytes 4..7) -> out byte 1
    gather = byte | ((4 + byte) << 4) | (byte << 8) | ((4 + byte) << 12)
    lines = ["{", ".reg .b32 g, m, h, l;", f"prmt.b32 g, $1, $2, {gather:#06x};"]
    if shift:
        lines.append(f"shr.b32 g, g, {shift};")
    if code_bits == 2:
        lines.append("and.b32 m, g, 0x0303;")  # codes in selector nibbles 0 and 2
        lines.append(f"prmt.b32 h, {_pack_bytes(hi):#010x}, 0, m;")
        lines.append(f"prmt.b32 l, {_pack_bytes(lo):#010x}, 0, m;")
        lines.append("prmt.b32 $0, l, h, 0x6240;")
    else:
        lines.append("and.b32 m, g, 0x0707;")  # magnitude indices in selector nibbles 0 and 2
        lines.append(f"prmt.b32 h, {_pack_bytes(hi[:4]):#010x}, {_pack_bytes(hi[4:]):#010x}, m;")
        lines.append(f"prmt.b32 l, {_pack_bytes(lo[:4]):#010x}, {_pack_bytes(lo[4:]):#010x}, m;")
        lines.append("prmt.b32 h, l, h, 0x6240;")
        # bit 3 of each code (bits 3 and 11 of g) -> bits 15 and 31: x (2^12 + 2^20), masked
        lines.append("and.b32 g, g, 0x0808;")
        lines.append("mul.lo.u32 g, g, 0x101000;")
        lines.append("and.b32 g, g, 0x80008000;")
        lines.append("xor.b32 $0, h, g;")
    lines.append("}")
    return " ".join(lines)


def ptx(grid_values, code_bits: int, field: int, dtype: str = "bfloat16") -> str:
    """The unary inline PTX (two uint32 code words -> two 16-bit values) for field ``field``."""
    if not 0 <= field < 32 // code_bits:
        raise ValueError(
            f"field must be in [0, {32 // code_bits}) for {code_bits}-bit codes, got {field}"
        )
    key = tuple(float(v) for v in _grid_1d(grid_values))
    return _ptx_cached(key, code_bits, field, dtype)


def emulate(words, grid_values, code_bits: int, field: int, dtype: str = "bfloat16"):
    """jax.numpy twin of `ptx` (interpret mode): the 16-bit value of field ``field`` of each
    uint32 word, as ``dtype``. Same tables, so the same bits as the GPU."""
    import jax.numpy as jnp
    from jax import lax

    table = table_values(grid_values, code_bits, dtype)
    code = (words >> np.uint32(field * code_bits)) & np.uint32((1 << code_bits) - 1)
    # a select per table entry with scalar constants (a kernel may not capture array constants)
    out = jnp.zeros(code.shape, jnp.uint16)
    for c, b in enumerate(table):
        out = jnp.where(code == np.uint32(c), np.uint16(b), out)
    return lax.bitcast_convert_type(out, getattr(jnp, dtype))
