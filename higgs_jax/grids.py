"""Quantization grids: MSE-optimal grids of the standard Gaussian, NF4 and integer levels.

Glossary:
  p      grid dimension: a grid point quantizes p consecutive (rotated, scaled) weights at once.
  n      number of grid points; codes are indices in [0, n).
  b      bits per weight, log2(n) / p.
  MSE    per-coordinate mean squared error E|x - q(x)|^2 / p for x ~ N(0, I_p).

The Gaussian grids are data files (`higgs_jax/data/grids/gauss_p{p}_n{n}.npy`, float32 (n, p),
points in lexicographic order) computed by `scripts/make_grids.py` (Lloyd-Max for p = 1, stochastic
Lloyd for p >= 2); `manifest.json` beside them lists them with their measured MSE. Files are read
lazily on first use and cached; nothing is read at import time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

GRID_KINDS = ("gauss", "nf4", "int")

# Per-coordinate Gaussian MSE of the reference grids (SPEC section 1, Monte-Carlo +-0.3%).
SPEC_GRID_MSE: dict[tuple[int, int], float] = {
    (1, 4): 0.1177,
    (1, 8): 0.03454,
    (1, 16): 0.00948,
    (2, 16): 0.1077,
    (2, 64): 0.02963,
    (2, 256): 0.00775,
    (2, 4096): 0.00059,
    (3, 64): 0.1012,
    (3, 512): 0.02712,
    (3, 4096): 0.00697,
    (4, 256): 0.09599,
    (4, 4096): 0.02552,
}

# bitsandbytes NF4 levels (SPEC section 4), in code order.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.69619, -0.52507, -0.39492, -0.28444, -0.18477, -0.09105, 0.0,
    0.07958, 0.16093, 0.24611, 0.33792, 0.44071, 0.56262, 0.72296, 1.0,
)  # fmt: skip

# Rows x grid points handled at once by `nearest_code` for p >= 2 (bounded memory, cache-sized).
_CHUNK_ELEMENTS = 1 << 19


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """Which grid: hashable, used as static metadata of quantized tensors.

    Attributes:
      kind: "gauss" (MSE-optimal grid of N(0, I_p), shipped data), "nf4" (the 16 bitsandbytes
        levels, p = 1) or "int" (symmetric integer levels for RTN, p = 1, n = 2^b; see
        `grid_values`).
      p: grid dimension.
      n: number of grid points.
    """

    kind: str
    p: int
    n: int

    def __post_init__(self):
        if self.kind not in GRID_KINDS:
            raise ValueError(f"grid kind must be one of {GRID_KINDS}, got {self.kind!r}")
        for name in ("p", "n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"grid {name} must be a positive integer, got {v!r}")
        if self.kind == "nf4" and (self.p, self.n) != (1, 16):
            raise ValueError(f"an nf4 grid has p=1, n=16, got p={self.p}, n={self.n}")
        if self.kind == "int" and (self.p != 1 or self.n < 4 or self.n & (self.n - 1)):
            raise ValueError(
                f"an int grid has p=1 and n=2^b with b >= 2, got p={self.p}, n={self.n}"
            )
        if self.n < 2:
            raise ValueError(f"a grid needs at least 2 points, got n={self.n}")

    @property
    def bits(self) -> float:
        """Bits per coordinate, log2(n) / p."""
        return math.log2(self.n) / self.p

    @property
    def code_bits(self) -> int:
        """Bits of one code (one p-vector), ceil(log2(n))."""
        return max(1, math.ceil(math.log2(self.n)))


def _data_dir():
    return importlib.resources.files("higgs_jax") / "data" / "grids"


@functools.cache
def _manifest() -> dict:
    return json.loads((_data_dir() / "manifest.json").read_text())


@functools.cache
def available_grids() -> tuple[tuple[int, int], ...]:
    """The shipped Gaussian grids as sorted (p, n) pairs (read from the manifest on first use)."""
    return tuple(sorted((int(e["p"]), int(e["n"])) for e in _manifest()["grids"].values()))


def manifest_entry(p: int, n: int) -> dict:
    """The manifest record of a shipped Gaussian grid (measured MSE, seeds, sample counts, ...)."""
    _check_available(p, n)
    return dict(_manifest()["grids"][f"p{p}_n{n}"])


def _check_available(p, n) -> None:
    if (p, n) not in available_grids():
        raise ValueError(
            f"no Gaussian grid with (p, n) = ({p!r}, {n!r}); available: {list(available_grids())}"
        )


def gauss_grid(p: int, n: int) -> GridSpec:
    """The spec of a shipped MSE-optimal Gaussian grid.

    Raises:
      ValueError: naming (p, n) and listing the available grids when no such grid is shipped.
    """
    _check_available(p, n)
    return GridSpec("gauss", int(p), int(n))


@functools.cache
def grid_values(spec: GridSpec) -> np.ndarray:
    """Grid points as a read-only float32 array of shape (n, p), row index = code.

    - "gauss": the shipped file, points in lexicographic order.
    - "nf4": the 16 NF4 levels in ascending order, shape (16, 1).
    - "int" with n = 2^b: codes 0 .. n-2 hold the 2^b - 1 symmetric levels
      -(2^(b-1) - 1) .. 2^(b-1) - 1 in ascending order; code n-1 is an unused duplicate of level 0
      (so that n is a power of two and max |level| = 2^(b-1) - 1; `nearest_code` never returns it).
      RTN dequantizes as level * scale with scale = absmax / (2^(b-1) - 1).
    """
    if spec.kind == "gauss":
        _check_available(spec.p, spec.n)
        with (_data_dir() / f"gauss_p{spec.p}_n{spec.n}.npy").open("rb") as f:
            g = np.load(f)
        if g.shape != (spec.n, spec.p):
            raise ValueError(
                f"grid file for {spec} has shape {g.shape}, expected {(spec.n, spec.p)}"
            )
        g = np.asarray(g, np.float32)
    elif spec.kind == "nf4":
        g = np.asarray(NF4_LEVELS, np.float32)[:, None]
    else:
        half = spec.n // 2 - 1
        g = np.concatenate([np.arange(-half, half + 1), [0]]).astype(np.float32)[:, None]
    g = np.array(g, np.float32, copy=True)
    g.flags.writeable = False
    return g


def grid_values_jnp(spec: GridSpec) -> jax.Array:
    """`grid_values(spec)` as a float32 jax array (a constant when called under `jit`).

    Deliberately not cached: a cached array created inside one trace would leak into the next.
    The numpy values are cached by `grid_values`.
    """
    return jnp.asarray(grid_values(spec), jnp.float32)


@functools.cache
def _scalar_tables(spec: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """p = 1: decision thresholds between the distinct sorted levels, and their first codes."""
    levels = grid_values(spec)[:, 0]
    uniq, first = np.unique(levels, return_index=True)  # sorted; first occurrence wins ties
    mids = (0.5 * (uniq[1:].astype(np.float64) + uniq[:-1])).astype(np.float32)
    return mids, first.astype(np.int32)


def nearest_code(v: jax.Array, spec: GridSpec, *, chunk: int | None = None) -> jax.Array:
    """Code of the nearest grid point (Euclidean) of every p-vector.

    Args:
      v: float array of shape (..., p).
      spec: the grid.
      chunk: vectors per step for p >= 2 (bounds the (chunk, n) score matrix); default about
        2^19 / n.

    Returns:
      int32 codes of shape v.shape[:-1]. Ties go to the lowest code (for p = 1: to the lower
      level). p = 1 uses the sorted levels' midpoints (exact, O(log n) per value); p >= 2 computes
      argmax_j 2<v, g_j> - |g_j|^2 over chunks of vectors, so memory stays bounded for any number
      of vectors. jit-compatible (`spec` is static).
    """
    v = jnp.asarray(v)
    if v.ndim < 1 or v.shape[-1] != spec.p:
        raise ValueError(f"nearest_code expects shape (..., {spec.p}) for {spec}, got {v.shape}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return _nearest_code(v.astype(jnp.float32), spec, chunk)


@functools.partial(jax.jit, static_argnames=("spec", "chunk"))
def _nearest_code(v: jax.Array, spec: GridSpec, chunk: int | None) -> jax.Array:
    batch_shape = v.shape[:-1]
    if spec.p == 1:
        mids, first = _scalar_tables(spec)
        pos = jnp.searchsorted(jnp.asarray(mids), v[..., 0], side="left")
        return jnp.asarray(first)[pos]
    g = grid_values_jnp(spec)  # (n, p)
    n, p = g.shape
    g2 = jnp.sum(g * g, axis=1)
    iota = jnp.arange(n, dtype=jnp.int32)
    x = v.reshape(-1, p)
    rows = x.shape[0]
    if rows == 0:
        return jnp.zeros(batch_shape, jnp.int32)
    chunk = min(chunk or max(8, _CHUNK_ELEMENTS // n), rows)
    pad = (-rows) % chunk
    x = jnp.pad(x, ((0, pad), (0, 0)))

    def one(xc):  # (chunk, p)
        # HIGHEST: TF32 matmuls on GPUs would pick wrong neighbours near cell boundaries.
        s = 2.0 * jnp.matmul(xc, g.T, precision=jax.lax.Precision.HIGHEST) - g2
        best = jnp.max(s, axis=1, keepdims=True)
        # max + masked min picks the same index as argmax but is several times faster on XLA:CPU.
        return jnp.min(jnp.where(s >= best, iota, n), axis=1)

    codes = jax.lax.map(one, x.reshape(-1, chunk, p)).reshape(-1)[:rows]
    return codes.reshape(batch_shape)


@functools.partial(jax.jit, static_argnames=("spec", "batch"))
def _sq_error_sum(key: jax.Array, spec: GridSpec, batch: int) -> jax.Array:
    x = jax.random.normal(key, (batch, spec.p), jnp.float32)
    q = grid_values_jnp(spec)[nearest_code(x, spec)]
    return jnp.sum((x - q) ** 2)


def grid_mse(spec: GridSpec, num_samples: int = 1 << 20, seed: int = 0) -> float:
    """Monte-Carlo per-coordinate MSE of nearest-point quantization of N(0, I_p).

    Args:
      spec: the grid.
      num_samples: number of Gaussian p-vectors, rounded up to a multiple of the batch (2^18).
      seed: PRNG seed.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    batch = min(num_samples, 1 << 18)
    nb = -(-num_samples // batch)
    key = jax.random.key(seed)
    total = 0.0
    for i in range(nb):
        total += float(_sq_error_sum(jax.random.fold_in(key, i), spec, batch))
    return total / (nb * batch * spec.p)
