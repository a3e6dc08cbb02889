"""Validation, activation rotation, padding and launch of the HIGGS matmul kernel.

Glossary: M = rows of x (all leading axes flattened), K = logical contraction dim, K_pad = K
padded to the Hadamard/group size, N = columns, p = grid dimension, n = grid points,
h = Hadamard block size, g = scale group size, unit = 32 consecutive codes of a column.

Forward pass (docs/ARCHITECTURE.md): ``y = block_hadamard(pad(x) * signs, h) @ Wrot (+ bias)``.
The rotation is a separate XLA op: one small matmul per Hadamard block with a +-1 matrix whose
columns are already in the kernel's activation order (`kernel_activations`; XLA fuses it with
the producer of x and the padding), or the butterfly FWHT plus a transpose where that does not
apply; the LUT matmul is the Pallas kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.higgs_matmul import gemv as _gemv
from pallas_kernels.higgs_matmul import fused as _fused
from pallas_kernels.higgs_matmul import kernel as _kernel
from pallas_kernels.higgs_matmul import kernel_nk as _kernel_nk
from pallas_kernels.higgs_matmul import nkpair as _nkpair
from pallas_kernels.higgs_matmul import pairdec as _pairdec
from pallas_kernels.higgs_matmul import regtab as _regtab
from pallas_kernels.higgs_matmul import rotate as _rotate
from pallas_kernels.higgs_matmul import splitk as _splitk
from pallas_kernels.higgs_matmul.config import MAX_FMA_M, MAX_M, Config, default_config, nk_config
from pallas_kernels.higgs_matmul.repack import SUPPORTED, KernelPackedWeight, repack

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
#: Smallest units per step on the "dot" path (one tensor-core dot of K = BKU per plane).
MIN_DOT_UNITS = 16


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`higgs_jax.norms.rms_norm` (imported lazily, as everything from higgs_jax here): the
    routes that do not normalise inside the rotation kernel call it, so they match the model."""
    from higgs_jax import norms

    return norms.rms_norm(x, scale, eps)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _is_weight(w) -> bool:
    return isinstance(w, KernelPackedWeight) or type(w).__name__ == "HiggsTensor"


def weight_problems(w) -> list[str]:
    """Why the kernel cannot take this weight (empty list: it can), whatever the activations."""
    if not _is_weight(w):
        return [f"w must be a HiggsTensor or KernelPackedWeight, got {type(w).__name__}"]
    out = []
    if getattr(w, "contraction_axis", 0) != 0:
        out.append(f"weight of shape {w.shape} is quantized along axis 1; need a (K, N) kernel")
    p, n = (w.p, w.n)
    if (p, n) not in SUPPORTED:
        out.append(
            f"grid (p={p}, n={n}) unsupported; kernel supports (p, n) in {sorted(SUPPORTED)}"
        )
    elif w.group_size % (32 * p):
        out.append(f"group_size={w.group_size} must be a multiple of 32*p={32 * p}")
    return out


def _problems(x, w, *, check_backend: bool) -> list[str]:
    out = weight_problems(w)
    if not _is_weight(w):
        return out
    k = w.shape[getattr(w, "contraction_axis", 0)]
    if not hasattr(x, "shape") or x.ndim < 1:
        return out + [f"x must be an array of shape (..., K), got {type(x).__name__}"]
    if x.shape[-1] != k:
        out.append(f"x has last dim {x.shape[-1]} but the weight has K={k}")
    if not any(x.dtype == d for d in _DTYPES):
        out.append(f"x dtype {x.dtype} unsupported (bfloat16, float16, float32)")
    elif (
        getattr(w, "layout", None) == _nkpair.LAYOUT
        and w.code_bits == 4
        and x.dtype == jnp.float16
    ):
        out.append("4-bit nk16 weights decode to bfloat16 only, got float16 activations")
    m = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    if m > MAX_M:
        out.append(f"M={m} rows exceeds the supported maximum {MAX_M}")
    if check_backend:
        cc = _compat.gpu_compute_capability()
        if cc is None:
            out.append(f"backend {jax.default_backend()!r} is not an NVIDIA GPU")
        elif cc < _compat.MIN_COMPUTE_CAPABILITY:
            out.append(f"compute capability {cc} < {_compat.MIN_COMPUTE_CAPABILITY} (Triton)")
    return out


def can_use_pallas(x: jax.Array, w) -> tuple[bool, str]:
    """Whether the Pallas kernel runs ``x @ w`` here (NVIDIA GPU, supported grid, M, dtype).

    Returns:
      (True, "ok") or (False, reason).
    """
    problems = _problems(x, w, check_backend=True)
    return (not problems, "; ".join(problems) or "ok")


def _block_fwht(x: jax.Array, h: int) -> jax.Array:
    """Orthonormal Sylvester Hadamard on blocks of h (a power of two) along the last axis.

    Fallback used only when `higgs_jax.hadamard` cannot be imported; same matrix (natural order).
    """
    if h & (h - 1):
        raise ValueError(f"hadamard_size={h} is not a power of two and higgs_jax is unavailable")
    lead, k = x.shape[:-1], x.shape[-1]
    y = x.reshape(lead + (k // h, h))
    s = 1
    while s < h:
        y = y.reshape(lead + (k // h, h // (2 * s), 2, s))
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        s *= 2
    return y.reshape(lead + (k,)) * np.float32(1 / np.sqrt(h))


def rotate_activations(x2: jax.Array, kw: KernelPackedWeight) -> jax.Array:
    """(M, K) -> (M, K_pad) float32: pad, random signs, block Hadamard (normalised)."""
    x = x2.astype(jnp.float32)
    if kw.k_pad != kw.K:
        x = jnp.pad(x, [(0, 0), (0, kw.k_pad - kw.K)])
    if kw.hadamard_size > 1:
        try:
            from higgs_jax import hadamard  # lazy: only rotated weights need it
        except ImportError:
            hadamard = None
        if hadamard is not None:
            return hadamard.block_hadamard(
                x, kw.hadamard_size, axis=-1, normalize=True, signs=kw.signs
            )
        if kw.signs is not None:
            x = x * kw.signs.astype(x.dtype)
        return _block_fwht(x, kw.hadamard_size)
    elif kw.signs is not None:
        x = x * kw.signs.astype(x.dtype)
    return x


def apply_outliers(kw: KernelPackedWeight, x2: jax.Array, y: jax.Array) -> jax.Array:
    """y (M, N) f32 + x2 @ S for the sparse full-precision outliers S (unrotated domain)."""
    if kw.outlier_values is None:
        return y
    contrib = x2[:, kw.outlier_rows].astype(jnp.float32) * kw.outlier_values.astype(jnp.float32)
    return y.at[:, kw.outlier_cols].add(contrib)


def _regtab_ok(kw: KernelPackedWeight) -> bool:
    if kw.p != 1 or kw.code_bits not in _regtab.CODE_BITS:
        return False
    try:
        _regtab.program(kw.grid_values)
    except ValueError:  # e.g. a 16-point grid that is not symmetric
        return False
    return True


def resolve_decode(
    decode: str, kw: KernelPackedWeight, path: str = "fma"
) -> tuple[str, tuple[float, ...]]:
    """Chooses the decoder ("auto") and returns it with its polynomial coefficients (if any)."""
    mags = _kernel.symmetric_magnitudes(kw.grid_values) if kw.p == 1 else None
    if decode == "auto":
        # Fastest measured on an H100: p = 1 grids: register tables (regtab, session 6, at
        # 8192x28672: M = 1 72.0 / 58.7 / 51.1 us vs 90.7 / 152.0 / 74.2 us for 4/3/2-bit;
        # M = 16 (dot path) 187.0 / 152.0 us vs 242.4 / 190.2 for 4/2-bit); otherwise bf16-pair gathers (two weights per
        # lookup; the grid rounded to bf16) wherever a pair fits in a word-aligned field, i.e.
        # every grid except 3-bit p=1 codes, which use the f32 gather (docs/KERNELS.md).
        if path in ("fma", "dot") and _regtab_ok(kw):
            decode = "regtab"
        else:
            decode = "gather" if (kw.p == 1 and kw.code_bits == 3) else "gather_pair"
    if decode == "poly":
        if mags is None:
            raise ValueError("decode='poly' needs a sorted, symmetric 1-D grid")
        return decode, _kernel.magnitude_poly(mags)
    if decode == "regpair":
        if kw.p != 1:
            raise ValueError(f"decode='regpair' needs p=1, got p={kw.p}")
        if path != "dot":
            raise ValueError(f"decode='regpair' runs on path='dot', got path={path!r}")
        _pairdec.check(kw.grid_values, kw.code_bits)
        return decode, ()
    if decode == "regtab":
        if kw.p != 1 or kw.code_bits not in _regtab.CODE_BITS:
            raise ValueError(
                f"decode='regtab' needs p=1 with code_bits in {_regtab.CODE_BITS}; got p={kw.p}, "
                f"code_bits={kw.code_bits}"
            )
        _regtab.program(kw.grid_values)  # validates the grid (16 points: symmetric)
        return decode, ()
    if (
        decode == "gather_pair"
        and kw.p not in (2, 4)
        and not (kw.p == 1 and kw.code_bits in (2, 4))
    ):
        raise ValueError(
            f"decode='gather_pair' needs p=2 or 4, or p=1 with 2- or 4-bit codes; got p={kw.p}, "
            f"code_bits={kw.code_bits}"
        )
    return decode, ()


def _lut(decode: str, kw: KernelPackedWeight) -> jax.Array:
    gv = np.asarray(kw.grid_values, np.float32)  # (n, p)
    if decode == "regtab":  # the byte tables, loaded by the kernel once into registers
        return jnp.asarray(np.asarray(_regtab.table_words(kw.grid_values), np.uint32))
    if decode == "gather_pair":
        bits = gv.astype(jnp.bfloat16).view(np.uint16).astype(np.uint32)
        if kw.p == 1:
            # Entry c0 | c1 << cb holds (grid[c0], grid[c1]) for two consecutive codes.
            n = bits.shape[0]
            c0, c1 = np.arange(n * n) % n, np.arange(n * n) // n
            return jnp.asarray(bits[c0, 0] | (bits[c1, 0] << np.uint32(16)), jnp.uint32)
        # p = 2: entry c holds (grid[c][0], grid[c][1]); p = 4: entries 2c, 2c + 1 hold
        # coordinates (0, 1) and (2, 3) of grid[c] (one cache line serves both lookups).
        pairs = bits[:, 0::2] | (bits[:, 1::2] << np.uint32(16))  # (n, p / 2)
        return jnp.asarray(pairs.reshape(-1), jnp.uint32)
    return jnp.asarray(gv.reshape(-1), jnp.float32)


#: Largest Hadamard block rotated by a matmul with an explicit (h, h) +-1 matrix; larger blocks
#: (and layouts where a block is not a whole number of kernel tiles) use the butterfly FWHT.
MAX_MATMUL_ROTATION_H = 2048


@functools.lru_cache(maxsize=None)
def rotation_matrix(h: int, p: int) -> np.ndarray:
    """(h, h) float32 with +-1 entries: ``xb @ Q`` = the unnormalized Hadamard of a block ``xb``
    (the same matrix as `higgs_jax.hadamard.block_hadamard`, Paley factors included), with the
    output columns in the kernel's blocked order (d, c, u): column ``(d 32 + c) XB + u`` holds
    rotated coordinate ``(32 u + c) p + d`` (XB = h / (32 p) units per block).
    """
    if h % (32 * p):
        raise ValueError(f"hadamard_size={h} is not a multiple of 32*p={32 * p}")
    with jax.ensure_compile_time_eval():  # may be first called while tracing
        eye = jnp.eye(h, dtype=jnp.float32)
        try:
            from higgs_jax import hadamard
        except ImportError:
            hm = _block_fwht(eye, h) * np.float32(np.sqrt(h))
        else:
            hm = hadamard.block_hadamard(eye, h, axis=-1, normalize=False)
        hm = np.rint(np.asarray(hm, np.float64)).astype(np.float32)  # row j = H e_j
    xb = h // (32 * p)
    d, c, u = np.meshgrid(np.arange(p), np.arange(32), np.arange(xb), indexing="ij")
    return np.ascontiguousarray(hm[:, ((32 * u + c) * p + d).reshape(-1)])


def activation_block(kw: KernelPackedWeight, bku: int) -> tuple[int, bool]:
    """(XB, by_matmul): units per activation block of the kernel layout, and whether the
    rotation is one matmul per Hadamard block (XB = h / (32 p)) or the FWHT (XB = BKU)."""
    h, p = kw.hadamard_size, kw.p
    xb = h // (32 * p) if h > 1 and h % (32 * p) == 0 else 0
    if xb and h <= MAX_MATMUL_ROTATION_H and (xb % bku == 0 or bku % xb == 0):
        return xb, True
    return bku, False


def kernel_activations(
    x2: jax.Array,
    kw: KernelPackedWeight,
    *,
    rows: int,
    units_x: int,
    bku: int,
    dtype,
    rotation: str = "xla",
    interpret: bool = False,
    norm: tuple[jax.Array, float] | None = None,
    norm_in_kernel: bool = False,
) -> tuple[jax.Array, int]:
    """(M, K) activations -> ((rows, NB, p, 32, XB) rotated activations in ``dtype``, XB).

    ``norm`` = (scale, eps): the activations are ``rms_norm(x2, scale, eps)`` instead of x2,
    computed inside the rotation kernel when ``norm_in_kernel`` and the "kernel" route applies
    (`Config.norm`), by `higgs_jax.norms.rms_norm` (XLA) otherwise.

    Entry [m, b, d, c, u] = x_rot[m, (32 (b XB + u) + c) p + d] with x_rot =
    block_hadamard(pad(x) * signs, h) (normalized), zero beyond K_pad and beyond M (kernel.x_plane
    reads it). When a Hadamard block is a whole number of kernel activation blocks, the rotation
    and the permutation are one matmul per block with `rotation_matrix` (+-1 entries, exact in the
    activation dtype; f32 accumulation), which XLA fuses with the producer of x and the padding:
    measured on an H100 (benchmarks/rotation_bench.py) 6.1 us vs 11.3-13.3 us for the butterfly
    FWHT plus transpose at M=1, K=4096/14336. Otherwise: the FWHT and a transpose (XB = BKU).
    """
    m, k = x2.shape
    p, h = kw.p, kw.hadamard_size
    xb, by_matmul = activation_block(kw, bku)
    in_kernel = by_matmul and rotation in ("kernel", "fused") and _rotate.supported(p, h)[0]
    if norm is not None and not (in_kernel and norm_in_kernel):
        x2, norm = rms_norm(x2, *norm), None
    if not by_matmul:
        xr = rotate_activations(x2, kw)
        xr = jnp.pad(xr, [(0, rows - m), (0, units_x * 32 * p - xr.shape[1])])
        xr = xr.reshape(rows, units_x // bku, bku, 32, p).transpose(0, 1, 4, 3, 2)
        return xr.astype(dtype), xb
    nb = -(-units_x // xb)
    if in_kernel:
        # one Pallas launch (Sylvester factors H_XB x H_32) instead of XLA's matmul + fusions
        y = _rotate.rotate(
            x2, kw.signs, h=h, rows=rows, blocks=nb, dtype=dtype, interpret=interpret, norm=norm
        )
        return y.reshape(rows, nb, p, 32, xb), xb
    x = x2
    if kw.signs is not None:  # +-1: exact in any float dtype
        x = x * kw.signs[:k].astype(x.dtype)
    x = jnp.pad(x, [(0, rows - m), (0, nb * h - k)]).reshape(rows, nb, h)
    if x.dtype == jnp.float32:
        q, prec = jnp.asarray(rotation_matrix(h, p)), jax.lax.Precision.HIGHEST
    else:
        q, prec = jnp.asarray(rotation_matrix(h, p), x.dtype), None
    y = jnp.dot(x, q, precision=prec, preferred_element_type=jnp.float32)
    y = y * np.float32(1.0 / np.sqrt(h))
    return y.reshape(rows, nb, p, 32, xb).astype(dtype), xb


def _plan(kw: KernelPackedWeight, cfg: Config, m: int, out_dtype) -> dict:
    """Static launch geometry: tiles, split-K, padded sizes, activation dtype."""
    p, cb = kw.p, kw.code_bits
    bku = cfg.units_per_step(p)
    split = max(1, min(cfg.split_k, -(-kw.units // bku)))
    steps = -(-kw.units // (split * bku))
    if cfg.path in ("fma", "gemv"):
        if m > MAX_FMA_M:
            raise ValueError(
                f"path={cfg.path!r} supports M <= {MAX_FMA_M}, got M={m}; use path='dot' or 'wide'"
            )
        if cfg.path == "gemv" and kw.p not in (1, 2):
            raise ValueError(f"path='gemv' supports p in (1, 2), got p={kw.p}; use path='fma'")
        if cfg.path == "gemv" and cb not in _gemv.BYTE_CODE_BITS:
            raise ValueError(
                f"path='gemv' needs code_bits in {_gemv.BYTE_CODE_BITS}, got {cb} (p={p}, "
                f"n={kw.n}); use path='fma'"
            )
        mp, bm, xdt = _next_pow2(m), 1, jnp.float32
    else:
        if cfg.path in ("dot", "nk") and bku < MIN_DOT_UNITS:
            # Each plane is one (BM, BKU) x (BKU, BN) tensor-core dot; Triton needs K >= 16.
            # Measured on an H100 (session 6): BKU = 4 and 8 returned wrong sums (rel. err 1-3).
            raise ValueError(
                f"path={cfg.path!r} needs block_k / (32 p) >= {MIN_DOT_UNITS} units per step (the K of "
                f"each tensor-core dot), got block_k={cfg.block_k} = {bku} units for p={p}"
            )
        bm = min(cfg.block_m, max(16, _next_pow2(m)))
        mp, xdt = -(-m // bm) * bm, out_dtype if out_dtype != jnp.float32 else jnp.bfloat16
    return dict(bku=bku, split=split, steps=steps, ux=split * steps * bku, mp=mp, bm=bm, xdt=xdt)


def prepare_activations(
    x2: jax.Array,
    kw: KernelPackedWeight,
    cfg: Config,
    m: int,
    out_dtype,
    interpret: bool = False,
    norm: tuple[jax.Array, float] | None = None,
) -> tuple[jax.Array, int]:
    """(M, K) activations -> (kernel operand, XB) for `launch_kernel` (XB = 0: wide layout).
    ``norm`` = (scale, eps): RMSNorm x2 first (see `kernel_activations`)."""
    g = _plan(kw, cfg, m, out_dtype)
    p, mp, ux = kw.p, g["mp"], g["ux"]
    if cfg.path != "wide":
        return kernel_activations(
            x2, kw, rows=mp, units_x=ux, bku=g["bku"], dtype=g["xdt"], rotation=cfg.rotation,
            interpret=interpret, norm=norm, norm_in_kernel=cfg.norm == "kernel",
        )
    if norm is not None:
        x2 = rms_norm(x2, *norm)
    xr = rotate_activations(x2, kw)
    xr = jnp.pad(xr, [(0, mp - m), (0, ux * 32 * p - xr.shape[1])])
    decode, _ = resolve_decode(cfg.decode, kw, cfg.path)
    # x[m, e, u * 32/q + c] = x_rot[m, (32u/q + c) pq + e]: slot e's activations for a tile of
    # units are one contiguous (BM, BKU * 32/q) slice in the order the kernel unpacks the codes
    # (q = 2: p = 1 pair decoding, slot e = code parity; q = 1: slot e = coordinate).
    q = 2 if (decode == "gather_pair" and p == 1) else 1
    xp = xr.reshape(mp, ux, 32 // q, p * q).transpose(0, 3, 1, 2)
    return xp.reshape(mp, p * q, ux * 32 // q).astype(g["xdt"]), 0


def tile_scale_applies(kw: KernelPackedWeight, cfg: Config) -> bool:
    """Whether the kernel scales whole tiles after their dots (`Config.tile_scale`): the "dot"
    path, the option on, and every loop step's BKU units inside one scale group (group size a
    multiple of block_k; tiles start at multiples of BKU units, so they never straddle)."""
    return cfg.path == "dot" and cfg.tile_scale and kw.group_size % cfg.block_k == 0


def _default_for(kw: KernelPackedWeight, m: int) -> Config:
    """`default_config` for this weight; its pair decoder ("regpair") only where it applies
    (tiles inside one scale group, a grid `pairdec` takes), else the "auto" decoder."""
    cfg = default_config(m, kw.K, kw.N, kw.p, kw.code_bits / kw.p)
    if cfg.decode == "regpair":
        try:
            _pairdec.check(kw.grid_values, kw.code_bits)
            ok = tile_scale_applies(kw, cfg)
        except ValueError:
            ok = False
        if not ok:
            cfg = dataclasses.replace(cfg, decode="auto")
    return cfg


def _check_layout(kw: KernelPackedWeight, cfg: Config) -> None:
    """The nk16 layout and the "nk" path go together; the path reads one stored block per step
    and scales whole tiles. (4-bit nk16 needs bfloat16 activations: `_problems` says so for the
    public entry points, `nkpair.program` for a direct kernel launch.)"""
    nk = kw.layout == _nkpair.LAYOUT
    if nk != (cfg.path == "nk"):
        raise ValueError(
            f"path={cfg.path!r} reads the {'nk16' if cfg.path == 'nk' else 'kn'} weight layout, "
            f"but this weight is in the {kw.layout!r} layout"
            + ("; convert it once with repack.to_nk16" if cfg.path == "nk" else "; use path='nk'")
        )
    if nk and cfg.units_per_step(kw.p) != _nkpair.BLOCK_UNITS:
        raise ValueError(
            f"path='nk' reads one block of {_nkpair.BLOCK_UNITS} units per step: block_k must be "
            f"{32 * _nkpair.BLOCK_UNITS}, got {cfg.block_k}"
        )
    if nk and (2 * kw.code_bits) % cfg.row_steps:
        raise ValueError(
            f"row_steps={cfg.row_steps} must divide the {2 * kw.code_bits} word rows of a "
            f"{kw.code_bits}-bit nk16 block"
        )
    if nk and kw.group_size % cfg.block_k:
        raise ValueError(
            f"path='nk' scales whole tiles: the group size {kw.group_size} must be a multiple of "
            f"block_k={cfg.block_k}"
        )


def launch_kernel(
    xk: jax.Array,
    xblk: int,
    kw: KernelPackedWeight,
    cfg: Config,
    m: int,
    out_dtype,
    interpret: bool,
    *,
    bias: jax.Array | None = None,
    y_dtype=jnp.float32,
    fused: bool = False,
) -> jax.Array:
    """Kernel operand from `prepare_activations` -> (M, N) ``y_dtype``, ``bias`` (N,) added in
    f32. Split-K partials summed by XLA (``cfg.reduce == "xla"``) or by the kernel ("kernel").
    ``fused``: ``xk`` is the raw (M, K) activations and the kernel rotates them in its prologue
    (`fused.py`; the caller checked `fused_rotation_applies`); ``xblk`` is then h / 32."""
    g = _plan(kw, cfg, m, out_dtype)
    p, cb, N = kw.p, kw.code_bits, kw.N
    bku, split, steps, ux, mp, bm = (g[k] for k in ("bku", "split", "steps", "ux", "mp", "bm"))
    units = kw.units
    bn = cfg.block_n
    n_out = -(-N // bn) * bn
    if cfg.path != "gemv" and cfg.decode in ("byte", "code"):
        raise ValueError(f"decode={cfg.decode!r} is for path='gemv', got path={cfg.path!r}")
    if cfg.decode == "regtab" and cfg.path not in ("fma", "dot"):
        raise ValueError(f"decode='regtab' runs on path='fma' or 'dot', got path={cfg.path!r}")
    if cfg.decode == "regpair" and not tile_scale_applies(kw, cfg):
        raise ValueError(
            "decode='regpair' needs path='dot' with tile_scale=True and each loop step inside one "
            f"scale group (group size {kw.group_size} a multiple of block_k={cfg.block_k}); got "
            f"path={cfg.path!r}, tile_scale={cfg.tile_scale}"
        )
    _check_layout(kw, cfg)
    common = dict(
        cb=cb,
        units=units,
        bku=bku,
        bn=bn,
        steps=steps,
        n_cols=N,
        group_units_num=32 * p,
        group_units_den=kw.group_size,
        num_groups=kw.scales.shape[0],
        mask_rows=ux != units,
        mask_cols=n_out != N,
        xblk=xblk,
    )
    operands = (xk, kw.words, kw.scales)
    if cfg.path == "nk":
        body = functools.partial(
            _kernel_nk.nk_kernel,
            grid_values=kw.grid_values,
            bm=bm,
            mma_m=min(cfg.mma_m, bm),
            dot_order=cfg.dot_order,
            row_steps=cfg.row_steps,
            interpret=interpret,
            **common,
        )
        name = f"higgs_matmul_p1_cb{cb}_nk" + ("_xw" if cfg.dot_order == "xw" else "")
        if cfg.row_steps > 1:
            name += f"_rs{cfg.row_steps}"
        if 0 < cfg.mma_m < bm:
            name += f"_mm{cfg.mma_m}"
    else:
        common.update(p=p, m_rows=mp)
        decode, coef = resolve_decode(
            cfg.decode if cfg.path != "gemv" else "auto", kw, cfg.path
        )
        if cfg.path == "gemv":
            lookup = cfg.decode if cfg.decode in ("byte", "code") else "auto"
            if lookup == "auto":
                lookup = "code" if kw.n <= 16 else "byte"
            body = functools.partial(
                _gemv.higgs_gemv_kernel,
                interpret=interpret,
                lookup=lookup,
                volatile=cfg.volatile,
                **common,
            )
            if lookup == "code":
                lut = jnp.asarray(_gemv.code_lut(kw.grid_values, p))
            else:
                lut = jnp.asarray(_gemv.byte_lut(kw.grid_values, p, cb))
            name = f"higgs_gemv_p{p}_cb{cb}"
        else:
            body = functools.partial(
                _kernel.higgs_matmul_kernel,
                path=cfg.path,
                decode=decode,
                grid_values=kw.grid_values,
                coef=coef,
                bm=bm,
                words=cfg.words,
                fused_fma=cfg.fused_fma,
                tile_scale=tile_scale_applies(kw, cfg),
                swap_dot=cfg.path == "dot" and cfg.dot_order == "wx",
                mma_m=min(cfg.mma_m, bm) if cfg.path == "dot" else 0,
                prefetch=cfg.prefetch if cfg.path in ("fma", "dot") else 0,
                x_rows_per_column_block=mp if fused else 0,
                interpret=interpret,
                **common,
            )
            lut = _lut(decode, kw)
            name = f"higgs_matmul_p{p}_cb{cb}_{cfg.path}_{decode}"
            if cfg.path == "dot" and cfg.dot_order == "wx":
                name += "_wx"
            if cfg.path == "dot" and 0 < cfg.mma_m < bm:
                name += f"_mm{cfg.mma_m}"
            if cfg.prefetch and cfg.path in ("fma", "dot"):
                if kw.words.size >= 2**31:
                    raise ValueError(
                        f"prefetch={cfg.prefetch} addresses the words with int32 offsets, but this "
                        f"weight has {kw.words.size} words (>= 2^31); use prefetch=0"
                    )
                name += f"_pf{cfg.prefetch}"
        operands += (lut,)
    if cfg.loop_stages and not interpret and cfg.path != "nk":
        if not _compat.install_loop_stages_hook():
            raise ValueError(
                f"loop_stages={cfg.loop_stages} needs jax's Pallas Triton lowering hook, which this "
                f"jax {jax.__version__} does not have; use loop_stages=0"
            )
        name = _compat.loop_stages_name(name, cfg.loop_stages)
    per_row_block = cfg.path in ("dot", "wide", "nk")
    grid = (n_out // bn, split, mp // bm if per_row_block else 1)
    partial_shape = jax.ShapeDtypeStruct((split, mp, n_out), jnp.float32)
    params = dict(
        grid=grid,
        compiler_params=None
        if interpret
        else _compat.compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
    )
    if bias is not None:
        bias = bias.astype(jnp.float32)
    if cfg.reduce == "kernel":
        extra = []
        if bias is not None:
            extra.append(jnp.pad(bias, (0, n_out - N)).reshape(1, n_out))
        n_tiles = grid[0] * grid[2]
        extra.append(jnp.zeros((n_tiles,), jnp.int32))  # per-tile counters, zero at launch
        kernel = _splitk.with_fixup(
            body,
            n_in=len(operands),
            has_bias=bias is not None,
            split=split,
            bn=bn,
            rows=bm if per_row_block else mp,
            rows_per_program=per_row_block,
            tiles_i=grid[2],
            interpret=interpret,
        )
        with _compat.quiet_triton_deprecation():
            _, y, _ = pl.pallas_call(
                kernel,
                out_shape=(
                    partial_shape,
                    jax.ShapeDtypeStruct((mp, n_out), y_dtype),
                    jax.ShapeDtypeStruct((n_tiles,), jnp.int32),
                ),
                input_output_aliases={len(operands) + len(extra) - 1: 2},
                name=name + "_rk",
                **params,
            )(*operands, *extra)
        return y[:m, :N]
    if fused:
        h = kw.hadamard_size
        nb = -(-ux // xblk)
        xr = xk
        if interpret and xr.shape != (mp, nb * h):  # interpret mode clamps windows: pad instead
            xr = jnp.pad(xr, [(0, mp - m), (0, nb * h - kw.K)])
        extra = []
        if kw.signs is not None:
            sg = jnp.pad(kw.signs[: kw.K].astype(jnp.float32), (0, nb * h - kw.K))
            extra.append(sg.reshape(1, nb * h))
        extra += [jnp.asarray(_rotate.sylvester(32)), jnp.asarray(_rotate.sylvester(xblk))]
        kernel = _fused.with_rotation(
            body, h=h, m=m, k=kw.K, mp=mp, nb=nb, steps=steps, bku=bku,
            has_signs=kw.signs is not None, interpret=interpret,
        )
        scratch = jax.ShapeDtypeStruct((grid[0] * mp, nb, 1, 32, xblk), g["xdt"])
        with _compat.quiet_triton_deprecation():
            partial, _ = pl.pallas_call(
                kernel, out_shape=(partial_shape, scratch), name=name + "_fr", **params
            )(xr, *operands[1:], *extra)
    else:
        with _compat.quiet_triton_deprecation():
            partial = pl.pallas_call(body, out_shape=partial_shape, name=name, **params)(
                *operands
            )
    y = jnp.sum(partial, axis=0)[:m, :N]
    if bias is not None:
        y = y + bias
    return y.astype(y_dtype)


def _launch(
    x2: jax.Array,
    kw: KernelPackedWeight,
    cfg: Config,
    m: int,
    out_dtype,
    interpret: bool,
    *,
    bias: jax.Array | None = None,
    y_dtype=jnp.float32,
    norm: tuple[jax.Array, float] | None = None,
):
    """x2: (M, K) activations (not rotated, not yet RMS-normalised when ``norm`` is given) ->
    (M, N) ``y_dtype`` (+ bias)."""
    if fused_rotation_applies(kw, cfg)[0]:
        if norm is not None:
            x2 = rms_norm(x2, *norm)
        return launch_kernel(
            x2, kw.hadamard_size // 32, kw, cfg, m, out_dtype, interpret, bias=bias,
            y_dtype=y_dtype, fused=True,
        )
    xk, xblk = prepare_activations(x2, kw, cfg, m, out_dtype, interpret, norm=norm)
    return launch_kernel(xk, xblk, kw, cfg, m, out_dtype, interpret, bias=bias, y_dtype=y_dtype)


def fused_rotation_applies(kw: KernelPackedWeight, cfg: Config) -> tuple[bool, str]:
    """(ok, reason): ``cfg.rotation == "fused"`` and the kernel can rotate x in its prologue
    (`fused.applies`); otherwise the op rotates in a separate launch as with "kernel"."""
    if cfg.rotation != "fused":
        return False, f"rotation={cfg.rotation!r}"
    by_matmul = activation_block(kw, cfg.units_per_step(kw.p))[1]
    return _fused.applies(kw.p, kw.hadamard_size, cfg.path, cfg.reduce, by_matmul)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "norm_eps"))
def _higgs_matmul(x, w, bias, config, interpret, norm_scale=None, norm_eps=None):
    kw = repack(w)
    lead = x.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    x2 = x.reshape(m, kw.K)
    if config is not None:
        cfg = config
    elif kw.layout == _nkpair.LAYOUT:
        cfg = nk_config(m, kw.K, kw.N, code_bits=kw.code_bits)
    else:
        cfg = _default_for(kw, m)
    # with sparse outliers the kernel's output stays f32 until they are added (one rounding)
    y_dtype = jnp.float32 if kw.outlier_values is not None else x.dtype
    norm = None if norm_scale is None else (norm_scale, norm_eps)
    y = _launch(x2, kw, cfg, m, x.dtype, interpret, bias=bias, y_dtype=y_dtype, norm=norm)
    if kw.outlier_values is not None:  # the outliers multiply the activations as normalised
        y = apply_outliers(kw, x2 if norm is None else rms_norm(x2, *norm), y)
    return y.astype(x.dtype).reshape(lead + (kw.N,))


def higgs_matmul_pallas(
    x: jax.Array,
    w,
    *,
    bias: jax.Array | None = None,
    config: Config | None = None,
    interpret: bool = False,
    norm_scale: jax.Array | None = None,
    norm_eps: float | None = None,
) -> jax.Array:
    """``x @ dequantize(w) (+ bias)`` with the Pallas Triton kernel (rotation of x included).

    Args:
      x: activations (..., K), bf16/f16/f32; at most 256 rows after flattening.
      w: `HiggsTensor` (repacked on the fly; free for 2/4/8-bit codes) or `KernelPackedWeight`
        from `repack` (do this once at load time for 3- and 6-bit codes).
      bias: optional (N,), added in f32.
      config: tiling; `default_config` when None.
      interpret: run the kernel in Pallas interpret mode (any backend; for tests).
      norm_scale, norm_eps: give both for ``rms_norm(x, norm_scale, norm_eps) @ dequantize(w)``
        (`higgs_jax.norms.rms_norm`); the rotation kernel normalises each row where it applies
        with ``Config.norm = "kernel"`` (and ``rotation = "kernel"``, p = 1, h = 512..2048);
        XLA does it first otherwise (the default: measured faster in the decode, `Config.norm`).

    Returns:
      (..., N) in x's dtype.

    Raises:
      ValueError: shape/dtype mismatch, unsupported grid, M > 256, or no NVIDIA GPU without
        ``interpret=True``.
    """
    problems = _problems(x, w, check_backend=not interpret)
    if bias is not None and tuple(bias.shape) != (w.shape[1 - getattr(w, "contraction_axis", 0)],):
        problems.append(f"bias has shape {tuple(bias.shape)}, want ({w.shape[1]},)")
    if config is not None and not isinstance(config, Config):
        problems.append(f"config must be a Config, got {type(config).__name__}")
    if (norm_scale is not None or norm_eps is not None) and hasattr(x, "shape"):
        from higgs_jax.norms import norm_problems

        problems += norm_problems(x, norm_scale, norm_eps)
    if problems:
        raise ValueError("higgs_matmul_pallas: " + "; ".join(problems))
    eps = None if norm_scale is None else float(norm_eps)
    return _higgs_matmul(x, w, bias, config, interpret, norm_scale, eps)
