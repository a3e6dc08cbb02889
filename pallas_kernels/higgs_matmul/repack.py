"""One-time repack of a `HiggsTensor` into the layout the kernel reads (`KernelPackedWeight`).

Glossary: K = contraction dim, N = columns, p = grid dimension, n = grid points,
cb = log2(n) code bits, Kc = K_pad / p codes per column, unit = 32 consecutive codes of a column,
U = ceil(Kc / 32) units per column.

Kernel layout: ``words: uint32[U, cb, N]``. A code of width cb is split into parts of widths
that divide 32 (2 -> (2,), 3 -> (2, 1), 4 -> (4,), 6 -> (4, 2), 8 -> (8,), 12 -> (8, 4)); part j
holds the code bits ``[o_j, o_j + w_j)`` where ``o_j`` is the sum of the earlier widths. Part j of unit u
takes the ``w_j`` consecutive word rows starting at ``sum of earlier widths``; in its word t the
field ``[s*w_j, (s+1)*w_j)`` holds that part of code ``32*u + t*(32/w_j) + s``. No field straddles
a word, so the kernel extracts a code with one shift and one mask per part. One exception: the
1-bit part of 3-bit codes (word row 2) holds bit 2 of code c at bit `BIT2_POSITION` [c] rather
than at bit c, the order in which the register-table decoder (`regtab`) needs those bits
(`part_shifts` gives every part's field positions).

Code order: codes index ``grid_values`` of the `KernelPackedWeight`, which for the 16-point
p = 1 grids is stored in *sign/magnitude order* (since session 7; `signmag_order`): code
c < 8 is the c-th smallest magnitude, negated, and code 8 + c the same magnitude, positive. The
register-table decoder then finds a code's magnitude index with one mask (``c & 7``) instead of
six ops per word. `from_arrays` relabels sorted-order codes once (c -> c ^ 7 for c < 8, an
involution on the packed nibbles, `relabel_signmag`); every decoder and the XLA reference read
``grid_values`` in whatever order it is stored, so nothing else changes.

For cb in {2, 8} (and cb = 4 with p = 2) this is *bit-identical* to the `HiggsTensor` layout
(docs/ARCHITECTURE.md) viewed as ``[U, cb, N]``: the repack is a free reshape; p = 1 16-point
grids take one elementwise pass over the words (the relabel above). For cb in {3, 6, 12} (whose codes straddle
words in the HiggsTensor layout) it is a real one-time bit shuffle of the same size (cb words
per unit, nothing wasted). Do it once at load time (`repack`) so the matmul never pays for it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED = {
    (1, 4): 2,
    (1, 8): 3,
    (1, 16): 4,
    (2, 16): 4,
    (2, 64): 6,
    (2, 256): 8,
    (4, 256): 8,
    (4, 4096): 12,
}
#: (p, n) -> code bits; the (p, bits) pairs the kernel supports: p in {1, 2} x bits in {2, 3, 4},
#: and p = 4 at 2 and 3 bits (n = 256, 4096: lower Gaussian MSE than p = 1, 2 at the same bits,
#: but slower lookups from their larger tables: docs/KERNELS.md, session 5).

_PARTS = {2: (2,), 3: (2, 1), 4: (4,), 6: (4, 2), 8: (8,), 12: (8, 4)}


def bit2_position(c: int) -> int:
    """Bit of word row 2 (3-bit codes) that holds bit 2 of code c (0..31) of a unit.

    The register-table decoder builds prmt selectors with nibble i = code 2i (or 2i + 1) of word
    row 0 (or 1); it needs each code's bit 2 at 4 i + 2. This order puts codes 2i, 2i + 1 at
    4 i + 2, 4 i + 3 and codes 16 + 2i, 17 + 2i at 4 i, 4 i + 1, so one shift and one mask place
    eight of them at once (`regtab`).
    """
    if not 0 <= c < 32:
        raise ValueError(f"code index within a unit must be in 0..31, got {c}")
    r, s = divmod(c, 16)
    return 4 * (s // 2) + (2 - 2 * r) + (s % 2)


BIT2_POSITION = tuple(bit2_position(c) for c in range(32))


def part_shifts(code_bits: int) -> tuple[tuple[int, ...], ...]:
    """Per part j: the bit offset, in its word, of field s (s < 32 / w_j)."""
    out = []
    for w in code_parts(code_bits):
        if code_bits == 3 and w == 1:
            out.append(BIT2_POSITION)
        else:
            out.append(tuple(s * w for s in range(32 // w)))
    return tuple(out)


def code_parts(code_bits: int) -> tuple[int, ...]:
    """Widths (each dividing 32) the code is split into, low bits first."""
    if code_bits not in _PARTS:
        raise ValueError(f"code_bits must be one of {sorted(_PARTS)}, got {code_bits!r}")
    return _PARTS[code_bits]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["words", "scales", "signs", "outlier_rows", "outlier_cols", "outlier_values"],
    meta_fields=[
        "shape",
        "dtype",
        "p",
        "n",
        "grid_values",
        "hadamard_size",
        "group_size",
        "k_pad",
        "layout",
    ],
)
@dataclasses.dataclass(frozen=True)
class KernelPackedWeight:
    """A HIGGS weight (K, N) in the kernel layout of this module's docstring.

    Invariant (``layout="kn"``, the default): ``words.shape == (U, cb, N)`` uint32 with
    ``U = ceil(k_pad / p / 32)``; ``layout="nk16"`` (p = 1, 2- and 4-bit codes, made by `to_nk16`
    for the "nk" kernel path): ``words.shape == (U / 16, 2 cb, N, 16)`` uint16 with U rounded up
    to a multiple of 16 (zero codes, counted in `nbytes`), the layout of `nkpair`. Either way
    ``scales.shape == (k_pad // group_size, N)``, ``signs`` is None or ``(k_pad,)``,
    optional sparse outliers ``W[outlier_rows[i], outlier_cols[i]] += outlier_values[i]`` (in W's
    unrotated domain, as in `HiggsTensor`),
    ``grid_values`` is a tuple of n tuples of p floats (the grid the codes index), and
    ``Wrot[k, c] = grid_values[code(k // p, c)][k % p] * scales[k // g, c]`` as for `HiggsTensor`.
    """

    words: jax.Array
    scales: jax.Array
    signs: jax.Array | None
    shape: tuple[int, int]
    dtype: str
    p: int
    n: int
    grid_values: tuple[tuple[float, ...], ...]
    hadamard_size: int
    group_size: int
    k_pad: int
    outlier_rows: jax.Array | None = None
    outlier_cols: jax.Array | None = None
    outlier_values: jax.Array | None = None
    layout: str = "kn"

    @property
    def K(self) -> int:
        return self.shape[0]

    @property
    def N(self) -> int:
        return self.shape[1]

    @property
    def code_bits(self) -> int:
        return SUPPORTED[(self.p, self.n)]

    @property
    def units(self) -> int:
        if self.layout == "nk16":
            return self.words.shape[0] * self.words.shape[3]
        return self.words.shape[0]

    @property
    def nbytes(self) -> int:
        total = self.words.size * jnp.dtype(self.words.dtype).itemsize
        total += self.scales.size * jnp.dtype(self.scales.dtype).itemsize
        return int(total + (0 if self.signs is None else self.signs.size))


def signmag_order(p: int, grid_values) -> np.ndarray | None:
    """Permutation ``perm`` with ``grid_values[perm]`` in sign/magnitude order, for the p = 1
    16-point grids stored sorted and symmetric (the Lloyd-Max Gaussian grids); None otherwise
    (other grids keep their order). ``perm`` is its own inverse: c -> c ^ 7 for c < 8."""
    from pallas_kernels.higgs_matmul import regtab  # lazy: regtab is only needed here

    gv = np.asarray(grid_values, np.float64).reshape(len(grid_values), -1)
    if p != 1 or gv.shape != (16, 1) or regtab.grid_order(gv[:, 0]) != "sorted":
        return None
    return np.asarray([c ^ 7 if c < 8 else c for c in range(16)])


def relabel_signmag(words: jax.Array) -> jax.Array:
    """Maps every 4-bit code c of uint32 ``words`` (8 nibbles each) to c ^ 7 if c < 8 (sorted
    order <-> sign/magnitude order; an involution)."""
    if not jnp.issubdtype(words.dtype, jnp.integer):
        raise ValueError(f"words must be an integer (uint32) array, got dtype {words.dtype}")
    w = words.astype(jnp.uint32)
    below = (~w >> np.uint32(3)) & np.uint32(0x11111111)  # 1 in the nibbles whose code is < 8
    return w ^ (below * np.uint32(7))


def kernel_grid_values(p: int, grid_values) -> tuple[tuple[float, ...], ...]:
    """``grid_values`` in the order the kernel layout stores it (`signmag_order`)."""
    gv = _grid_tuple(grid_values)
    perm = signmag_order(p, gv)
    return gv if perm is None else tuple(gv[int(c)] for c in perm)


def _grid_tuple(values) -> tuple[tuple[float, ...], ...]:
    arr = np.asarray(values, np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    return tuple(tuple(float(v) for v in row) for row in arr)


def pack_kernel_words(codes: jax.Array, code_bits: int) -> jax.Array:
    """Integer codes ``(Kc, N)`` -> ``uint32[U, cb, N]`` in the kernel layout (zero padded)."""
    parts = code_parts(code_bits)
    kc, ncols = codes.shape
    units = -(-kc // 32)
    c = codes.astype(jnp.uint32)
    if units * 32 != kc:
        c = jnp.pad(c, [(0, units * 32 - kc), (0, 0)])
    c = c.reshape(units, 32, ncols)
    out, offset = [], 0
    for w, sh in zip(parts, part_shifts(code_bits)):
        cpw = 32 // w
        field = (c >> np.uint32(offset)) & np.uint32((1 << w) - 1)
        field = field.reshape(units, w, cpw, ncols)
        shifts = np.asarray(sh, np.uint32)[None, None, :, None]
        # Fields are disjoint, so the sum is a bitwise OR.
        out.append(jnp.sum(field << shifts, axis=2, dtype=jnp.uint32))
        offset += w
    return jnp.concatenate(out, axis=1)


def unpack_kernel_words(words: jax.Array, code_bits: int) -> jax.Array:
    """Inverse of `pack_kernel_words`: ``uint32[U, cb, N]`` -> int32 codes ``(32 U, N)``."""
    parts = code_parts(code_bits)
    units, _, ncols = words.shape
    code = jnp.zeros((units, 32, ncols), jnp.uint32)
    row, offset = 0, 0
    for w, sh in zip(parts, part_shifts(code_bits)):
        wd = words[:, row : row + w]  # (U, w, N)
        shifts = np.asarray(sh, np.uint32)[None, None, :, None]
        field = (wd[:, :, None, :] >> shifts) & np.uint32((1 << w) - 1)
        code = code | (field.reshape(units, 32, ncols) << np.uint32(offset))
        row += w
        offset += w
    return code.reshape(units * 32, ncols).astype(jnp.int32)


def kernel_codes(kw: KernelPackedWeight) -> jax.Array:
    """int32 codes (32 U, N) of a `KernelPackedWeight` in either layout (tests, reference)."""
    if kw.layout == "nk16":
        from pallas_kernels.higgs_matmul import nkpair

        return nkpair.unpack_pair_words(kw.words, kw.code_bits)
    return unpack_kernel_words(kw.words, kw.code_bits)


def from_arrays(
    codes_packed: jax.Array,
    scales: jax.Array,
    grid_values,
    *,
    shape: tuple[int, int],
    k_pad: int,
    group_size: int,
    hadamard_size: int = 1,
    signs: jax.Array | None = None,
    dtype: str = "bfloat16",
    outliers: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> KernelPackedWeight:
    """Builds the kernel layout from raw arrays in the `HiggsTensor` layout (docs/ARCHITECTURE.md).

    Args:
      codes_packed: ``uint32[K_words, N]`` packed as `higgs_jax.packing.pack_codes` does.
      scales: ``[k_pad // group_size, N]``.
      grid_values: ``(n, p)`` (or ``(n,)`` for p = 1) grid the codes index.
      shape: logical (K, N).
    """
    gv = _grid_tuple(grid_values)
    n, p = len(gv), len(gv[0])
    if (p, n) not in SUPPORTED:
        raise ValueError(
            f"grid (p={p}, n={n}) is not supported by the kernel; supported (p, n): {sorted(SUPPORTED)}"
        )
    cb = SUPPORTED[(p, n)]
    K, N = shape
    kc = k_pad // p
    units = -(-kc // 32)
    if codes_packed.dtype != jnp.uint32 or tuple(codes_packed.shape) != (units * cb, N):
        raise ValueError(
            f"codes have shape {codes_packed.shape} {codes_packed.dtype}, want ({units * cb}, {N}) uint32"
        )
    if tuple(scales.shape) != (k_pad // group_size, N):
        raise ValueError(f"scales have shape {scales.shape}, want ({k_pad // group_size}, {N})")
    if cb in (2, 4, 8):
        words = codes_packed.reshape(units, cb, N)
        if signmag_order(p, gv) is not None:
            words = relabel_signmag(words)
            gv = kernel_grid_values(p, gv)
    else:
        from higgs_jax import packing  # lazy: only the straddling widths need unpacking

        codes = packing.unpack_codes(codes_packed, cb, kc)
        words = pack_kernel_words(codes, cb)
    return KernelPackedWeight(
        words=words,
        scales=scales,
        signs=signs,
        shape=(int(K), int(N)),
        dtype=str(dtype),
        p=p,
        n=n,
        grid_values=gv,
        hadamard_size=int(hadamard_size),
        group_size=int(group_size),
        k_pad=int(k_pad),
        outlier_rows=None if outliers is None else outliers[0],
        outlier_cols=None if outliers is None else outliers[1],
        outlier_values=None if outliers is None else outliers[2],
    )


def repack(qt) -> KernelPackedWeight:
    """`HiggsTensor` -> `KernelPackedWeight` (pure; call once at load time, e.g. under `jax.jit`).

    Raises:
      ValueError: if the tensor was quantized along axis 1 or its (p, n) is not supported.
    """
    if isinstance(qt, KernelPackedWeight):
        return qt
    if getattr(qt, "contraction_axis", 0) != 0:
        raise ValueError(
            f"weight of shape {qt.shape} was quantized along axis {qt.contraction_axis}; "
            "the kernel needs a (K, N) kernel quantized along axis 0"
        )
    from higgs_jax import grids  # lazy: higgs_jax is only needed for HiggsTensor inputs

    return from_arrays(
        qt.codes,
        qt.scales,
        np.asarray(grids.grid_values(qt.grid)),
        shape=tuple(qt.shape),
        k_pad=qt.k_pad,
        group_size=qt.group_size,
        hadamard_size=qt.hadamard_size,
        signs=qt.signs,
        dtype=qt.dtype,
        outliers=(
            None
            if getattr(qt, "outlier_values", None) is None
            else (qt.outlier_rows, qt.outlier_cols, qt.outlier_values)
        ),
    )


def nk16_problem(kw: KernelPackedWeight) -> str | None:
    """Why ``kw`` cannot run on the "nk" path after `to_nk16`, or None if it can: p = 1, 2- or
    4-bit codes (4-bit: a symmetric grid), scale groups of whole 16-unit steps (512 k rows)."""
    from pallas_kernels.higgs_matmul import nkpair

    if kw.p != 1:
        return f"p={kw.p} (nk16 holds p = 1 codes)"
    try:
        nkpair.check(kw.grid_values, kw.code_bits)  # a KernelPackedWeight's grid is in kernel order
    except ValueError as e:
        return str(e)
    if kw.group_size % (32 * nkpair.BLOCK_UNITS):
        return f"group size {kw.group_size} is not a multiple of {32 * nkpair.BLOCK_UNITS}"
    return None


def to_nk16(w) -> KernelPackedWeight:
    """`HiggsTensor` or `KernelPackedWeight` -> the same weight in the "nk16" layout
    (`nkpair.py`; p = 1 grids with 2- or 4-bit codes), which the kernel's "nk" path reads. A
    one-time transpose and bit shuffle of the same size, plus zero units up to a multiple of 16
    units per column (at most 15 x 32 codes); do it once at load time. Idempotent.

    Raises:
      ValueError: p != 1, code width other than 2 or 4, or a 16-point grid that is not
        symmetric.
    """
    from pallas_kernels.higgs_matmul import nkpair  # lazy: only this layout needs it

    kw = repack(w)
    if kw.layout == nkpair.LAYOUT:
        return kw
    if kw.p != 1:
        raise ValueError(f"the nk16 layout holds p = 1 codes, got p={kw.p}")
    nkpair.check(kw.grid_values, kw.code_bits)
    codes = unpack_kernel_words(kw.words, kw.code_bits)  # (32 U, N)
    pad = -kw.units % nkpair.BLOCK_UNITS
    if pad:
        codes = jnp.pad(codes, [(0, 32 * pad), (0, 0)])
    words = nkpair.pack_pair_words(codes, kw.code_bits)
    return dataclasses.replace(kw, words=words, layout=nkpair.LAYOUT)


def to_nk16_tree(tree) -> tuple[object, int, dict[str, str]]:
    """Every `KernelPackedWeight` leaf of a pytree that the "nk" path takes (`nk16_problem`),
    converted once with `to_nk16`; the others stay in the kn layout.

    Returns:
      (tree, number of leaves converted, {leaf path: why it stayed}).
    """
    kept: dict[str, str] = {}
    count = [0]
    conv = jax.jit(to_nk16)

    def one(path, x):
        if not isinstance(x, KernelPackedWeight) or x.layout == "nk16":
            return x
        why = nk16_problem(x)
        if why is not None:
            kept[jax.tree_util.keystr(path)] = why
            return x
        count[0] += 1
        return conv(x)

    out = jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, KernelPackedWeight)
    )
    return out, count[0], kept
