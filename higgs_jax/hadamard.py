"""Hadamard matrices and fast Hadamard transforms (power-of-two and Paley orders).

Glossary:
  n      order of a Hadamard matrix H (n x n, entries +-1, H @ H.T == n * I).
  2^k    the power-of-two (Sylvester) factor of n; applied with the FWHT in O(n log n).
  m      the remaining factor: 1 or a Paley order; applied as a dense m x m matmul.
  q      a prime power; GF(q) the finite field with q elements.
  chi    the quadratic character of GF(q): chi(0) = 0, +1 on non-zero squares, -1 otherwise.
  h      block size of `block_hadamard`: H_h is applied to every run of h consecutive entries.

Orders supported: n = 2^k * m with m = 1 or m a Paley order
  Paley I:  q = 3 (mod 4) -> m = q + 1,      H = I + [[0, 1^T], [-1, Q]]
  Paley II: q = 1 (mod 4) -> m = 2 (q + 1),  C = [[0, 1^T], [1, Q]] with each 0 replaced by
            [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]]
with the Jacobsthal matrix Q_ab = chi(a - b). The full matrix is H_n = Sylvester(2^k) (x) H_m
(Kronecker product), so row/column index i = a * m + b with a < 2^k, b < m. When both Paley
constructions give an order m, Paley I is used.

Transforms compute in float32 and return the input dtype (or `out_dtype`). Nothing is computed at
import; matrices are built on first use and cached (read-only numpy arrays).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "block_hadamard",
    "fwht",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_transform",
    "is_hadamard_order",
    "paley_orders",
    "random_signs",
]


# ----------------------------------------------------------------------------------------------
# Number theory and GF(q)
# ----------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q == p**e and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of a modulo the monic f over GF(p); coefficient lists low degree first."""
    a = [c % p for c in a]
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i]
        if c:
            for j in range(d + 1):
                a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    rem = a[:d]
    return rem + [0] * (d - len(rem))


def _irreducible(p: int, e: int) -> list[int]:
    """The first (lexicographic) monic irreducible polynomial of degree e over GF(p)."""
    for coeffs in itertools.product(range(p), repeat=e):
        f = list(coeffs) + [1]
        if f[0] == 0:
            continue
        has_factor = any(
            not any(_poly_rem(f, list(g) + [1], p))
            for d in range(1, e // 2 + 1)
            for g in itertools.product(range(p), repeat=d)
        )
        if not has_factor:
            return f
    raise ValueError(f"no irreducible polynomial of degree {e} over GF({p})")  # unreachable


@functools.lru_cache(maxsize=64)
def _quadratic_character_table(q: int) -> np.ndarray:
    """Jacobsthal matrix Q (q x q, int8) of GF(q): Q[a, b] = chi(a - b).

    Field elements are integers 0..q-1 whose base-p digits are the coefficients of a polynomial in
    GF(p)[x] / f (f irreducible of degree e), so subtraction is digit-wise mod p.
    """
    pe = _prime_power(q)
    if pe is None:
        raise ValueError(f"q={q} is not a prime power")
    p, e = pe
    digits = np.array([[(a // p**i) % p for i in range(e)] for a in range(q)], dtype=np.int64)
    if e == 1:
        squares = {(a * a) % p for a in range(1, p)}
    else:
        f = _irreducible(p, e)
        squares = set()
        for a in range(1, q):
            da = digits[a].tolist()
            prod = [0] * (2 * e - 1)
            for i in range(e):
                for j in range(e):
                    prod[i + j] += da[i] * da[j]
            r = _poly_rem(prod, f, p)
            squares.add(sum(c * p**i for i, c in enumerate(r)))
    chi = -np.ones(q, dtype=np.int8)
    chi[0] = 0
    chi[sorted(squares)] = 1
    powers = p ** np.arange(e, dtype=np.int64)
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ powers  # index of a - b
    return chi[diff]


def _paley_source(m: int) -> tuple[str, int] | None:
    """('I', q) or ('II', q) if m is a Paley order (Paley I preferred), else None."""
    if m >= 4 and _prime_power(m - 1) is not None and (m - 1) % 4 == 3:
        return ("I", m - 1)
    if m >= 12 and m % 2 == 0 and (q := m // 2 - 1) % 4 == 1 and _prime_power(q) is not None:
        return ("II", q)
    return None


@functools.lru_cache(maxsize=64)
def _paley_matrix(m: int) -> np.ndarray:
    kind_q = _paley_source(m)
    if kind_q is None:
        raise ValueError(f"m={m} is not a Paley order")
    kind, q = kind_q
    jac = _quadratic_character_table(q).astype(np.int64)
    if kind == "I":
        s = np.zeros((m, m), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jac
        h = np.eye(m, dtype=np.int64) + s
    else:
        c = np.zeros((q + 1, q + 1), dtype=np.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = jac
        zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int64)
        sign_block = np.array([[1, 1], [1, -1]], dtype=np.int64)
        h = np.kron(c, sign_block) + np.kron(c == 0, zero_block)
    return h


# ----------------------------------------------------------------------------------------------
# Orders and dense matrices
# ----------------------------------------------------------------------------------------------


def _as_order(n) -> int | None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        return None
    return int(n)


def paley_orders(max_order: int) -> tuple[int, ...]:
    """All Paley I and Paley II orders <= max_order, ascending (powers of two included).

    Args:
      max_order: inclusive upper bound.

    Returns:
      Sorted tuple of orders q + 1 (q = 3 mod 4) and 2 (q + 1) (q = 1 mod 4), q a prime power.
    """
    orders = {m for m in range(4, int(max_order) + 1, 4) if _paley_source(m) is not None}
    return tuple(sorted(orders))


def hadamard_factorization(n: int) -> tuple[int, int]:
    """Canonical factorization n = 2^k * m used by the transforms.

    Args:
      n: a positive integer.

    Returns:
      (2^k, m) with the largest power of two for which m is 1 or a Paley order.

    Raises:
      ValueError: naming n, if no such factorization exists (e.g. 6, 172, 0, -4).
    """
    order = _as_order(n)
    if order is None or order < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got n={n!r}")
    pow2 = order & -order
    while pow2 >= 1:
        m = order // pow2
        if m == 1 or _paley_source(m) is not None:
            return pow2, m
        pow2 //= 2
    raise ValueError(
        f"n={order} is not a supported Hadamard order: need n = 2^k * m with m = 1 or a Paley "
        f"order (q+1, q = 3 mod 4, or 2(q+1), q = 1 mod 4, q a prime power)"
    )


def is_hadamard_order(n: int) -> bool:
    """True if `hadamard_matrix(n)` is available (n = 1, 2^k, or 2^k times a Paley order)."""
    try:
        hadamard_factorization(n)
    except ValueError:
        return False
    return True


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@functools.lru_cache(maxsize=64)
def _paley_factor_f32(m: int) -> np.ndarray:
    h = _paley_matrix(m).astype(np.float32)
    h.flags.writeable = False
    return h


@functools.lru_cache(maxsize=32)
def hadamard_matrix(n: int) -> np.ndarray:
    """The dense Hadamard matrix of order n used by the transforms.

    Args:
      n: a supported order (see `is_hadamard_order`).

    Returns:
      Read-only float32 array of +-1 of shape (n, n) with H @ H.T == n * I exactly, equal to
      kron(Sylvester(2^k), H_m) for (2^k, m) = hadamard_factorization(n).
    """
    pow2, m = hadamard_factorization(n)
    h = _sylvester(pow2)
    if m > 1:
        h = np.kron(h, _paley_matrix(m))
    h = h.astype(np.float32)
    h.flags.writeable = False
    return h


# ----------------------------------------------------------------------------------------------
# Fast transforms
# ----------------------------------------------------------------------------------------------


def _result_dtype(x: jax.Array, out_dtype) -> jnp.dtype:
    if out_dtype is not None:
        return jnp.dtype(out_dtype)
    dt = jnp.dtype(x.dtype)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.dtype(jnp.float32)


def _fwht_mid(x: jax.Array) -> jax.Array:
    """Unnormalized Sylvester transform along axis 1 of a float32 (pre, L, post) array."""
    pre, length, post = x.shape
    half = 1
    while half < length:
        # Pairs (i, i + half) inside every run of 2 * half entries: y_i = a + b, y_{i+half} = a - b.
        v = x.reshape(pre, length // (2 * half), 2, half, post)
        a, b = v[:, :, 0], v[:, :, 1]
        x = jnp.stack([a + b, a - b], axis=2).reshape(pre, length, post)
        half *= 2
    return x


def _transform_mid(x: jax.Array, n: int, *, transpose: bool) -> jax.Array:
    """Unnormalized H_n (or H_n^T) along axis 1 of a float32 (pre, n, post) array."""
    pre, _, post = x.shape
    pow2, m = hadamard_factorization(n)
    if m > 1:
        hm = jnp.asarray(_paley_factor_f32(m))
        spec = "pamq,cm->pacq" if not transpose else "pamq,mc->pacq"
        x = jnp.einsum(spec, x.reshape(pre, pow2, m, post), hm, precision=jax.lax.Precision.HIGHEST)
    if pow2 > 1:
        # Sylvester is symmetric, so `transpose` leaves this factor alone; (m, post) act as "post".
        x = _fwht_mid(x.reshape(pre, pow2, m * post))
    return x.reshape(pre, n, post)


def _normalize_axis(x: jax.Array, axis: int) -> int:
    if not isinstance(axis, numbers.Integral) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis!r} is out of range for an array of shape {tuple(x.shape)}")
    return int(axis) % x.ndim


def _split3(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def fwht(x: jax.Array, *, normalize: bool = True) -> jax.Array:
    """Fast Walsh-Hadamard transform (Sylvester order) along the last axis.

    Args:
      x: array (..., n) with n a power of two; bf16, f16 or f32 (computed in float32).
      normalize: divide by sqrt(n) (orthonormal, self-inverse transform).

    Returns:
      y with y[..., i] = sum_j (-1)^popcount(i & j) x[..., j] (/ sqrt(n)), dtype of x.
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("fwht needs an array with at least one axis, got a scalar")
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last axis, got n={n} (shape {x.shape})")
    return _block_apply(
        x,
        None,
        h=n,
        axis=x.ndim - 1,
        normalize=normalize,
        transpose=False,
        dtype=_result_dtype(x, None),
    )


def hadamard_transform(
    x: jax.Array,
    *,
    axis: int = -1,
    normalize: bool = True,
    transpose: bool = False,
    out_dtype=None,
) -> jax.Array:
    """Applies H_n to every vector along `axis`: y_i = sum_j H[i, j] x_j.

    FWHT on the power-of-two factor, a dense m x m matmul (HIGHEST precision) on the Paley factor.

    Args:
      x: array whose `axis` has a supported order n (see `is_hadamard_order`).
      axis: axis to transform; other axes are batch axes.
      normalize: divide by sqrt(n), making the transform orthonormal.
      transpose: apply H_n^T instead (the inverse of the orthonormal transform).
      out_dtype: result dtype; default x's dtype (float32 for non-float inputs).

    Returns:
      Array of x's shape.

    Raises:
      ValueError: if n is not a supported order or axis is out of range.
    """
    x = jnp.asarray(x)
    ax = _normalize_axis(x, axis)
    n = x.shape[ax]
    hadamard_factorization(n)  # validates n
    return _block_apply(
        x,
        None,
        h=n,
        axis=ax,
        normalize=normalize,
        transpose=transpose,
        dtype=_result_dtype(x, out_dtype),
    )


def block_hadamard(
    x: jax.Array,
    h: int,
    *,
    axis: int = -1,
    normalize: bool = True,
    transpose: bool = False,
    signs: jax.Array | None = None,
    out_dtype=None,
) -> jax.Array:
    """Applies H_h to each consecutive block of h entries along `axis`.

    With `signs` s, computes H_h(s * x) when transpose=False and s * H_h^T(x) when transpose=True,
    so the orthonormal pair block_hadamard(., h, signs=s) and
    block_hadamard(., h, transpose=True, signs=s) are inverses of each other.

    Args:
      x: array; x.shape[axis] must be a multiple of h (never padded here).
      h: block size, a supported Hadamard order.
      axis: axis to transform.
      normalize: divide by sqrt(h) (orthonormal).
      transpose: use H_h^T.
      signs: optional +-1 array of shape (x.shape[axis],) (any real dtype).
      out_dtype: result dtype; default x's dtype (float32 for non-float inputs).

    Returns:
      Array of x's shape.

    Raises:
      ValueError: if h is unsupported, x.shape[axis] % h != 0, or signs has the wrong shape.
    """
    x = jnp.asarray(x)
    ax = _normalize_axis(x, axis)
    length = x.shape[ax]
    hadamard_factorization(h)  # validates h
    if length % h:
        raise ValueError(
            f"axis {axis} has length {length}, which is not a multiple of the Hadamard block "
            f"size h={h} (shape {tuple(x.shape)}); pad explicitly before calling block_hadamard"
        )
    if signs is not None and tuple(signs.shape) != (length,):
        raise ValueError(
            f"signs must have shape ({length},) to match axis {axis} of x, got {tuple(signs.shape)}"
        )
    return _block_apply(
        x,
        None if signs is None else jnp.asarray(signs),
        h=h,
        axis=ax,
        normalize=normalize,
        transpose=transpose,
        dtype=_result_dtype(x, out_dtype),
    )


@functools.partial(jax.jit, static_argnames=("h", "axis", "normalize", "transpose", "dtype"))
def _block_apply(x, signs, *, h, axis, normalize, transpose, dtype):
    """Validated core of all transforms: H_h on every block of h entries along `axis`."""
    pre, length, post = _split3(x.shape, axis)
    y = x.astype(jnp.float32).reshape(pre, length, post)
    s = None if signs is None else signs.astype(jnp.float32).reshape(1, length, 1)
    if s is not None and not transpose:
        y = y * s
    y = _transform_mid(y.reshape(pre * (length // h), h, post), h, transpose=transpose)
    y = y.reshape(pre, length, post)
    if normalize:
        y = y * np.float32(1.0 / math.sqrt(h))
    if s is not None and transpose:
        y = y * s
    return y.reshape(x.shape).astype(dtype)


def random_signs(key: jax.Array, n: int) -> jax.Array:
    """n independent uniform +-1 values (int8) drawn from `key`."""
    order = _as_order(n)
    if order is None or order < 0:
        raise ValueError(f"n must be a non-negative integer, got n={n!r}")
    return jax.random.rademacher(key, (order,), dtype=jnp.int8)
