"""Dense bit-packing of b-bit codes into uint32 words along the leading axis.

Glossary: L = number of codes per column (along K), N = columns, cb = code width in bits.

Layout (see docs/ARCHITECTURE.md): codes are zero-padded along axis 0 to a multiple of 32.
Each group of 32 consecutive codes of a column occupies ``cb`` consecutive uint32 rows of the
same column; code i of the group sits at bits ``[i*cb, i*cb + cb)`` of the little-endian bit
stream formed by those ``cb`` words (word 0 holds stream bits 0..31). So the packed array really
is ``cb`` bits per code (plus the padding to 32 codes), for every width 1..16, including the
widths 3, 6, 9, 12 whose codes straddle word boundaries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CODES_PER_GROUP = 32
MAX_CODE_BITS = 16


def _check_bits(code_bits: int) -> None:
    if not isinstance(code_bits, (int, np.integer)) or not 1 <= code_bits <= MAX_CODE_BITS:
        raise ValueError(f"code_bits must be an integer in [1, {MAX_CODE_BITS}], got {code_bits!r}")


def padded_length(num_codes: int) -> int:
    """Number of code slots after padding ``num_codes`` to a multiple of 32."""
    return -(-num_codes // CODES_PER_GROUP) * CODES_PER_GROUP


def packed_rows(num_codes: int, code_bits: int) -> int:
    """Rows of uint32 words that ``num_codes`` codes of ``code_bits`` bits occupy."""
    _check_bits(code_bits)
    return padded_length(num_codes) // CODES_PER_GROUP * code_bits


def _layout(code_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static per-code layout of a 32-code group: first word, bit offset, straddles next word."""
    start = np.arange(CODES_PER_GROUP) * code_bits
    word, offset = start // 32, start % 32
    return word, offset, offset + code_bits > 32


def pack_codes(codes: jax.Array, code_bits: int) -> jax.Array:
    """Packs integer codes ``(L, ...)`` into uint32 words ``(ceil(L/32)*cb, ...)`` along axis 0.

    Args:
      codes: integer array whose values lie in ``[0, 2**code_bits)``; axis 0 is the packing axis.
      code_bits: width of one code in bits (1..16).

    Returns:
      uint32 array; codes beyond ``L`` (padding) are zero.
    """
    _check_bits(code_bits)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    length = codes.shape[0]
    rest = codes.shape[1:]
    pad = padded_length(length) - length
    c = codes.astype(jnp.uint32) & np.uint32((1 << code_bits) - 1)
    if pad:
        c = jnp.pad(c, [(0, pad)] + [(0, 0)] * len(rest))
    groups = c.shape[0] // CODES_PER_GROUP
    c = c.reshape((groups, CODES_PER_GROUP) + rest)
    word, offset, straddle = _layout(code_bits)
    bshape = (1, CODES_PER_GROUP) + (1,) * len(rest)
    # Low part of every code goes to its first word, the high part of a straddling code to the
    # next word. Bits of different codes never overlap, so summing the parts is a bitwise OR.
    low = c << offset.astype(np.uint32).reshape(bshape)
    high_shift = np.where(straddle, 32 - offset, 0).astype(np.uint32).reshape(bshape)
    high = jnp.where(straddle.reshape(bshape), c >> high_shift, np.uint32(0))
    seg = np.concatenate([word, np.where(straddle, word + 1, word)])
    parts = jnp.concatenate([low, high], axis=1)  # (groups, 64, ...)
    packed = jax.ops.segment_sum(jnp.moveaxis(parts, 1, 0), seg, num_segments=code_bits)
    packed = jnp.moveaxis(packed, 0, 1)  # (groups, cb, ...)
    return packed.reshape((groups * code_bits,) + rest)


def unpack_codes(packed: jax.Array, code_bits: int, num_codes: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: returns int32 codes ``(num_codes, ...)``."""
    _check_bits(code_bits)
    if packed.dtype != jnp.uint32:
        raise ValueError(f"packed codes must be uint32, got {packed.dtype}")
    expected = packed_rows(num_codes, code_bits)
    if packed.shape[0] != expected:
        raise ValueError(
            f"packed array has {packed.shape[0]} rows but {num_codes} codes of {code_bits} bits "
            f"need {expected}"
        )
    rest = packed.shape[1:]
    groups = expected // code_bits
    words = packed.reshape((groups, code_bits) + rest)
    word, offset, straddle = _layout(code_bits)
    bshape = (1, CODES_PER_GROUP) + (1,) * len(rest)
    # One static gather of each code's first (and next) word, then shifts: a handful of
    # vectorised ops instead of 32 slices, which keeps compiled programs small.
    lo = jnp.take(words, word, axis=1) >> offset.astype(np.uint32).reshape(bshape)
    nxt = jnp.take(words, np.minimum(word + 1, code_bits - 1), axis=1)
    hi_shift = np.where(straddle, 32 - offset, 0).astype(np.uint32).reshape(bshape)
    hi = jnp.where(straddle.reshape(bshape), nxt << hi_shift, np.uint32(0))
    out = ((lo | hi) & np.uint32((1 << code_bits) - 1)).reshape((groups * CODES_PER_GROUP,) + rest)
    return out[:num_codes].astype(jnp.int32)
