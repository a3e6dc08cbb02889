"""Frozen quantization specs: HIGGS and the RTN / NF4 baselines.

Glossary: K = contraction dim, N = output dim, h = Hadamard block size, g = scale group size,
p = grid dimension, n = grid points, b = bits per weight of the grid = log2(n)/p.

Every spec is a frozen, hashable dataclass validated on construction, so it can be used as a
static argument of jitted functions and as a value in path rules. Strings are accepted only for
dtype names and are parsed here, once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp

from higgs_jax import grids

INDIVISIBLE_POLICIES = ("auto", "pad", "error")
SCALE_DTYPES = ("bfloat16", "float16", "float32")


def _check_scale_dtype(name: str) -> None:
    if name not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {name!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class HiggsConfig:
    """HIGGS: block Hadamard rotation + MSE-optimal Gaussian grid (SPEC §1).

    Attributes:
      bits: bits per weight of the grid, log2(n)/p (scales are extra and counted separately).
      p: grid dimension (1..4); consecutive p-vectors along K share one code.
      hadamard_size: Hadamard block size h along K; 1 disables the rotation. Power of two or a
        supported non-power-of-two order (see `higgs_jax.hadamard.is_hadamard_order`).
      group_size: scale group size g in rotated coordinates; must divide h. None means g = h
        (one scale per Hadamard block, as in the paper).
      scale_dtype: dtype the scales are stored in.
      random_signs: flip the signs of W's rows with a seeded random +-1 vector before rotating
        (needs a PRNG key at quantization time; the signs are stored in the tensor).
      indivisible: what to do when h does not divide K: "auto" uses the supported Hadamard order
        dividing K that is closest to h (within a factor of 2) and otherwise pads K; "pad" always
        pads K with zeros to a multiple of h (the padding is counted in bits/weight); "error" raises.
    """

    bits: float = 4
    p: int = 2
    hadamard_size: int = 512
    group_size: int | None = None
    scale_dtype: str = "bfloat16"
    random_signs: bool = False
    indivisible: Literal["auto", "pad", "error"] = "auto"

    def __post_init__(self):
        if not _is_int(self.p) or not 1 <= self.p <= 4:
            raise ValueError(f"p must be an integer in 1..4, got {self.p!r}")
        if not isinstance(self.bits, (int, float)) or isinstance(self.bits, bool) or self.bits <= 0:
            raise ValueError(f"bits must be a positive number, got {self.bits!r}")
        n = 2 ** (self.bits * self.p)
        if abs(n - round(n)) > 1e-6:
            raise ValueError(
                f"bits={self.bits} with p={self.p} gives a non-integer grid size 2^(bits*p)={n:g}"
            )
        grids.gauss_grid(self.p, round(n))  # raises ValueError listing the available grids
        if not _is_int(self.hadamard_size) or self.hadamard_size < 1:
            raise ValueError(f"hadamard_size must be a positive integer, got {self.hadamard_size!r}")
        from higgs_jax import hadamard

        if not hadamard.is_hadamard_order(self.hadamard_size):
            raise ValueError(
                f"hadamard_size={self.hadamard_size} is not a supported Hadamard order "
                "(powers of two and 2^k*m with m a Paley order, e.g. 12, 20, 28, 36)"
            )
        if self.hadamard_size % self.p:
            raise ValueError(f"p={self.p} must divide hadamard_size={self.hadamard_size}")
        if self.group_size is not None:
            if not _is_int(self.group_size) or self.group_size < 1:
                raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
            if self.hadamard_size % self.group_size or self.group_size % self.p:
                raise ValueError(
                    f"group_size={self.group_size} must divide hadamard_size={self.hadamard_size} "
                    f"and be a multiple of p={self.p}"
                )
        _check_scale_dtype(self.scale_dtype)
        if self.indivisible not in INDIVISIBLE_POLICIES:
            raise ValueError(
                f"indivisible must be one of {INDIVISIBLE_POLICIES}, got {self.indivisible!r}"
            )

    @property
    def n(self) -> int:
        return round(2 ** (self.bits * self.p))

    @property
    def grid(self) -> grids.GridSpec:
        return grids.gauss_grid(self.p, self.n)

    @property
    def method(self) -> str:
        return "higgs"

    def describe(self) -> str:
        g = self.group_size or self.hadamard_size
        extra = ", signs" if self.random_signs else ""
        return f"HIGGS b={self.bits:g} p={self.p} n={self.n} h={self.hadamard_size} g={g}{extra}"


@dataclasses.dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest, symmetric absmax integer grid per group of g weights along K.

    Levels are -(2^(b-1)-1) .. 2^(b-1)-1 times absmax/(2^(b-1)-1); codes take b bits.
    """

    bits: int = 4
    group_size: int = 128
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"RTN bits must be an integer in 2..8, got {self.bits!r}")
        if not _is_int(self.group_size) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        _check_scale_dtype(self.scale_dtype)

    @property
    def grid(self) -> grids.GridSpec:
        return grids.GridSpec("int", 1, 2**self.bits)

    @property
    def p(self) -> int:
        return 1

    @property
    def method(self) -> str:
        return "rtn"

    def describe(self) -> str:
        return f"RTN b={self.bits} g={self.group_size}"


@dataclasses.dataclass(frozen=True)
class NF4Config:
    """NF4 (bitsandbytes levels) with absmax scaling per block of `block_size` weights along K."""

    block_size: int = 64
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        _check_scale_dtype(self.scale_dtype)

    @property
    def grid(self) -> grids.GridSpec:
        return grids.GridSpec("nf4", 1, 16)

    @property
    def p(self) -> int:
        return 1

    @property
    def bits(self) -> int:
        return 4

    @property
    def group_size(self) -> int:
        return self.block_size

    @property
    def method(self) -> str:
        return "nf4"

    def describe(self) -> str:
        return f"NF4 block={self.block_size}"


QuantSpec = HiggsConfig | RTNConfig | NF4Config


def scale_jnp_dtype(name: str):
    return {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[name]


def code_bits(grid: grids.GridSpec) -> int:
    return max(1, math.ceil(math.log2(grid.n)))
