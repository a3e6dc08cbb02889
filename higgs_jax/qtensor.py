"""`HiggsTensor`: a quantized weight matrix as a JAX pytree.

Glossary: K = contraction dim, N = output dim, K_pad = K padded to a multiple of h (and g),
h = Hadamard block size (1 = no rotation), g = scale group size (rotated coordinates),
p = grid dimension, n = grid points, cb = ceil(log2 n) bits per code.

The tensor stands for W of shape (K, N) (a Flax `kernel`, y = x @ W). Invariant, checked by
`validate()`:

    codes   uint32[packed_rows(K_pad // p, cb), N]   (layout: `higgs_jax.packing`)
    scales  float[K_pad // g, N]
    signs   int8[K_pad] of +-1, or None
    outlier_rows / outlier_cols  int32[S], outlier_values float32[S], or all None

    Wrot[k, c] = grid[code[k // p, c], k % p] * scales[k // g, c]        (k < K_pad)
    W          = (signs[:, None] *) blockwise(H_h^T / sqrt(h)) @ Wrot,  then W[:K]
    W[r_i, c_i] += v_i                       for each stored outlier i (QuantEase, full precision)

If the original array was stored the other way round (``contraction_axis == 1``, e.g. a PyTorch
(out, in) weight), `shape` is that original shape and `dequantize` returns it in that orientation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax import grids, hadamard, packing
from higgs_jax.config import code_bits


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "signs", "outlier_rows", "outlier_cols", "outlier_values"],
    meta_fields=[
        "shape",
        "dtype",
        "grid",
        "hadamard_size",
        "group_size",
        "k_pad",
        "contraction_axis",
    ],
)
@dataclasses.dataclass(frozen=True)
class HiggsTensor:
    """A bit-packed, grid-quantized 2-D weight (see the module docstring for the invariant).

    Attributes:
      codes: uint32 packed grid indices.
      scales: per-(group, column) scales, bf16 by default.
      signs: optional int8 +-1 random signs applied along K before the rotation.
      outlier_rows, outlier_cols, outlier_values: optional sparse full-precision correction S
        (W ~ W_hat + S), indices in the (K, N) orientation; counted in bits/weight.
      shape: logical shape of the array this stands for (as the caller passed it).
      dtype: name of the dtype of the original array (what `dequantize` returns).
      grid: which grid (kind, p, n) the codes index.
      hadamard_size: h; 1 means no rotation (RTN / NF4 baselines).
      group_size: g, scale group size along (rotated) K.
      k_pad: K padded to a multiple of h and g.
      contraction_axis: which axis of `shape` is K (0 for Flax kernels).
    """

    codes: jax.Array
    scales: jax.Array
    signs: jax.Array | None
    shape: tuple[int, int]
    dtype: str
    grid: grids.GridSpec
    hadamard_size: int
    group_size: int
    k_pad: int
    contraction_axis: int = 0
    outlier_rows: jax.Array | None = None
    outlier_cols: jax.Array | None = None
    outlier_values: jax.Array | None = None

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_values is None else int(self.outlier_values.shape[0])

    # -- array-like metadata -------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def K(self) -> int:  # noqa: N802 - glossary name
        return self.shape[self.contraction_axis]

    @property
    def N(self) -> int:  # noqa: N802 - glossary name
        return self.shape[1 - self.contraction_axis]

    @property
    def p(self) -> int:
        return self.grid.p

    @property
    def n(self) -> int:
        return self.grid.n

    @property
    def code_bits(self) -> int:
        return code_bits(self.grid)

    @property
    def num_codes(self) -> int:
        """Codes per column (p-vectors along the padded K)."""
        return self.k_pad // self.grid.p

    # -- storage accounting --------------------------------------------------------------
    @property
    def storage_bits(self) -> int:
        """Every bit stored: packed codes (incl. padding) + scales + signs."""
        bits = int(np.prod(self.codes.shape)) * 32
        bits += int(np.prod(self.scales.shape)) * jnp.dtype(self.scales.dtype).itemsize * 8
        for extra in (self.signs, self.outlier_rows, self.outlier_cols, self.outlier_values):
            if extra is not None:
                bits += int(np.prod(extra.shape)) * jnp.dtype(extra.dtype).itemsize * 8
        return bits

    @property
    def nbytes(self) -> int:
        return self.storage_bits // 8

    @property
    def bits_per_weight(self) -> float:
        """Stored bits divided by the number of logical weights (codes + scales + padding)."""
        return self.storage_bits / self.size

    def validate(self) -> None:
        """Checks the shape/dtype invariant of the module docstring; raises ValueError."""
        problems = []
        if len(self.shape) != 2:
            problems.append(f"shape {self.shape} is not 2-D")
        if self.contraction_axis not in (0, 1):
            problems.append(f"contraction_axis {self.contraction_axis} not in (0, 1)")
        K, N = self.K, self.N  # noqa: N806
        h, g, p = self.hadamard_size, self.group_size, self.grid.p
        if self.k_pad < K or self.k_pad % h or self.k_pad % g or self.k_pad % p:
            problems.append(f"k_pad={self.k_pad} must be >= K={K} and a multiple of h={h}, g={g}, p={p}")
        want_codes = (packing.packed_rows(self.k_pad // p, self.code_bits), N)
        if tuple(self.codes.shape) != want_codes or self.codes.dtype != jnp.uint32:
            problems.append(f"codes {self.codes.shape} {self.codes.dtype}, want {want_codes} uint32")
        want_scales = (self.k_pad // g, N)
        if tuple(self.scales.shape) != want_scales:
            problems.append(f"scales shape {self.scales.shape}, want {want_scales}")
        if self.signs is not None and tuple(self.signs.shape) != (self.k_pad,):
            problems.append(f"signs shape {self.signs.shape}, want ({self.k_pad},)")
        outl = (self.outlier_rows, self.outlier_cols, self.outlier_values)
        if any(o is None for o in outl) and not all(o is None for o in outl):
            problems.append("outlier_rows/cols/values must be all set or all None")
        elif outl[0] is not None and not (outl[0].shape == outl[1].shape == outl[2].shape):
            problems.append(f"outlier arrays differ in shape: {[o.shape for o in outl]}")
        if problems:
            raise ValueError("invalid HiggsTensor: " + "; ".join(problems))

    def __repr__(self) -> str:
        return (
            f"HiggsTensor(shape={self.shape}, dtype={self.dtype}, grid={self.grid.kind}"
            f"(p={self.grid.p}, n={self.grid.n}), h={self.hadamard_size}, g={self.group_size}, "
            f"k_pad={self.k_pad}, bits/weight={self.bits_per_weight:.3f})"
        )


def is_quantized(x: Any) -> bool:
    return isinstance(x, HiggsTensor)


def unpack(qt: HiggsTensor) -> jax.Array:
    """int32 codes of shape (K_pad // p, N)."""
    return packing.unpack_codes(qt.codes, qt.code_bits, qt.num_codes)


def decode_rotated(qt: HiggsTensor, codes: jax.Array | None = None) -> jax.Array:
    """Wrot, float32 of shape (K_pad, N): grid values times scales, still in the rotated domain."""
    if codes is None:
        codes = unpack(qt)
    lut = jnp.asarray(grids.grid_values(qt.grid), jnp.float32)  # (n, p)
    vals = jnp.take(lut, codes, axis=0)  # (Kc, N, p)
    vals = jnp.swapaxes(vals, 1, 2).reshape(qt.k_pad, codes.shape[1])
    scales = jnp.repeat(qt.scales.astype(jnp.float32), qt.group_size, axis=0)
    return vals * scales


def unrotate(qt: HiggsTensor, w_rot: jax.Array) -> jax.Array:
    """Maps rotated-domain rows (K_pad, ...) back to W's rows (still padded)."""
    if qt.hadamard_size > 1:
        w_rot = hadamard.block_hadamard(
            w_rot, qt.hadamard_size, axis=0, normalize=True, transpose=True, signs=qt.signs
        )
    elif qt.signs is not None:
        w_rot = w_rot * qt.signs.astype(w_rot.dtype)[:, None]
    return w_rot


def apply_outliers(qt: HiggsTensor, x: jax.Array, y: jax.Array) -> jax.Array:
    """y + x @ S for the sparse outlier part S of `qt` (no-op without outliers)."""
    if qt.outlier_values is None:
        return y
    contrib = x[..., qt.outlier_rows].astype(jnp.float32) * qt.outlier_values.astype(jnp.float32)
    return y.at[..., qt.outlier_cols].add(contrib.astype(y.dtype))


def rotate_activations(qt: HiggsTensor, x: jax.Array) -> jax.Array:
    """x (..., K) -> x_rot (..., K_pad) so that x @ W == x_rot @ Wrot (float32)."""
    if x.shape[-1] != qt.K:
        raise ValueError(f"x has last dim {x.shape[-1]} but the quantized weight has K={qt.K}")
    x = x.astype(jnp.float32)
    if qt.k_pad != qt.K:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, qt.k_pad - qt.K)])
    if qt.hadamard_size > 1:
        x = hadamard.block_hadamard(x, qt.hadamard_size, axis=-1, normalize=True, signs=qt.signs)
    elif qt.signs is not None:
        x = x * qt.signs.astype(x.dtype)
    return x


def dequantize(qt: HiggsTensor, dtype=None) -> jax.Array:
    """The dense array `qt` stands for, in its original orientation and dtype (or `dtype`)."""
    w = unrotate(qt, decode_rotated(qt))[: qt.K]
    if qt.outlier_values is not None:
        w = w.at[qt.outlier_rows, qt.outlier_cols].add(qt.outlier_values.astype(w.dtype))
    if qt.contraction_axis == 1:
        w = w.T
    return w.astype(dtype or qt.dtype)
