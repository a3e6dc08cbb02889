"""Quantization grids: MSE-optimal grids of N(0, I_p), NF4 levels, symmetric integer levels.

Glossary: p = grid dimension, n = number of points, bits = log2(n)/p per weight,
code_bits = ceil(log2 n) per p-vector code.

Gaussian grids are computed by `scripts/make_grids.py` (Lloyd / CLVQ, fixed seed) and shipped as
`.npy` files in `higgs_jax/data/grids/` with a `manifest.json`; they are read lazily on first use
and cached (read-only arrays). Nothing is read at import time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

GRID_KINDS = ("gauss", "nf4", "int")

#: bitsandbytes NF4 levels (SPEC §4).
NF4_LEVELS = (
    -1.0, -0.69619, -0.52507, -0.39492, -0.28444, -0.18477, -0.09105, 0.0,
    0.07958, 0.16093, 0.24611, 0.33792, 0.44071, 0.56262, 0.72296, 1.0,
)

#: Per-coordinate Gaussian MSE of the reference grids (SPEC §1, Monte-Carlo +-0.3%).
SPEC_GRID_MSE: dict[tuple[int, int], float] = {
    (1, 4): 0.1177, (1, 8): 0.03454, (1, 16): 0.00948,
    (2, 16): 0.1077, (2, 64): 0.02963, (2, 256): 0.00775, (2, 4096): 0.00059,
    (3, 64): 0.1012, (3, 512): 0.02712, (3, 4096): 0.00697,
    (4, 256): 0.09599, (4, 4096): 0.02552,
}


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """Which grid: `kind` ("gauss" | "nf4" | "int"), dimension `p`, number of points `n`.

    Hashable, so it can be static metadata of a `HiggsTensor` and a jit static argument.
    "int" grids hold the 2^b - 1 symmetric levels -(2^(b-1)-1)..2^(b-1)-1 (plus one unused
    duplicate of 0 so that n = 2^b); RTN dequantizes level * absmax / (2^(b-1)-1).
    """

    kind: str
    p: int
    n: int

    def __post_init__(self):
        if self.kind not in GRID_KINDS:
            raise ValueError(f"grid kind must be one of {GRID_KINDS}, got {self.kind!r}")
        if not isinstance(self.p, int) or not isinstance(self.n, int) or self.p < 1 or self.n < 2:
            raise ValueError(f"invalid grid size p={self.p!r}, n={self.n!r}")

    @property
    def bits(self) -> float:
        return math.log2(self.n) / self.p

    @property
    def code_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.n)))


@functools.lru_cache(maxsize=1)
def _manifest() -> dict:
    path = resources.files("higgs_jax") / "data" / "grids" / "manifest.json"
    return json.loads(path.read_text())


def available_grids() -> tuple[tuple[int, int], ...]:
    """(p, n) of every shipped Gaussian grid, sorted."""
    return tuple(sorted((int(g["p"]), int(g["n"])) for g in _manifest()["grids"].values()))


def gauss_grid(p: int, n: int) -> GridSpec:
    """The spec of a shipped Gaussian grid; ValueError listing what exists otherwise."""
    if (p, n) not in available_grids():
        raise ValueError(
            f"no Gaussian grid with (p, n) = ({p}, {n}); available: {list(available_grids())}"
        )
    return GridSpec("gauss", p, n)


@functools.lru_cache(maxsize=None)
def grid_values(spec: GridSpec) -> np.ndarray:
    """(n, p) float32 grid points (read-only)."""
    if spec.kind == "nf4":
        if (spec.p, spec.n) != (1, 16):
            raise ValueError(f"NF4 grid is (p, n) = (1, 16), got ({spec.p}, {spec.n})")
        out = np.asarray(NF4_LEVELS, np.float32)[:, None]
    elif spec.kind == "int":
        bits = int(round(math.log2(spec.n)))
        if spec.p != 1 or 2**bits != spec.n:
            raise ValueError(f"int grid needs p = 1 and n a power of two, got {spec}")
        q = 2 ** (bits - 1) - 1
        out = np.concatenate([np.arange(-q, q + 1), [0]]).astype(np.float32)[:, None]
    else:
        entry = _manifest()["grids"].get(f"p{spec.p}_n{spec.n}")
        if entry is None:
            raise ValueError(
                f"no Gaussian grid with (p, n) = ({spec.p}, {spec.n}); available: "
                f"{list(available_grids())}"
            )
        path = resources.files("higgs_jax") / "data" / "grids" / entry["file"]
        with path.open("rb") as f:
            out = np.load(f).astype(np.float32)
        if out.shape != (spec.n, spec.p):
            raise ValueError(f"grid file {entry['file']} has shape {out.shape}, "
                             f"expected {(spec.n, spec.p)}")
    out.setflags(write=False)
    return out


def _nearest_scalar(v: jax.Array, levels: np.ndarray) -> jax.Array:
    order = np.argsort(levels, kind="stable")
    sorted_lv = levels[order]
    mids = jnp.asarray((sorted_lv[1:] + sorted_lv[:-1]) / 2, jnp.float32)
    idx = jnp.searchsorted(mids, v, side="left")
    return jnp.asarray(order, jnp.int32)[idx]


def nearest_code(v: jax.Array, spec: GridSpec, *, chunk: int = 1 << 14) -> jax.Array:
    """Index of the nearest grid point for each p-vector.

    Args:
      v: (..., p) float array.
      spec: the grid.
      chunk: vectors per step for p >= 2 (bounds the (chunk, n) distance matrix).

    Returns:
      int32 codes of shape v.shape[:-1].
    """
    g = grid_values(spec)
    if v.shape[-1] != spec.p:
        raise ValueError(f"vectors have last dim {v.shape[-1]} but the grid has p={spec.p}")
    lead = v.shape[:-1]
    x = jnp.asarray(v, jnp.float32).reshape(-1, spec.p)
    if spec.p == 1:
        return _nearest_scalar(x[:, 0], g[:, 0]).reshape(lead)
    gj = jnp.asarray(g)
    half_norm = 0.5 * jnp.sum(gj * gj, axis=1)

    def best(block):  # argmax <v, g> - |g|^2 / 2  ==  argmin |v - g|^2
        scores = jnp.matmul(block, gj.T, precision=jax.lax.Precision.HIGHEST) - half_norm
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)

    m = x.shape[0]
    if m <= chunk:
        return best(x).reshape(lead)
    pad = (-m) % chunk
    xp = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, spec.p)
    codes = jax.lax.map(best, xp).reshape(-1)[:m]
    return codes.reshape(lead)


def grid_mse(spec: GridSpec, num_samples: int = 1 << 20, seed: int = 0) -> float:
    """Monte-Carlo per-coordinate MSE of the grid on N(0, I_p)."""
    x = jax.random.normal(jax.random.key(seed), (num_samples, spec.p), jnp.float32)
    c = nearest_code(x, spec)
    err = jnp.asarray(grid_values(spec))[c] - x
    return float(jnp.mean(err * err))
