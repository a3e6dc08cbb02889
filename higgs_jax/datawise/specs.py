"""Frozen specs of the data-aware methods: HIGGS+GPTQ and QuantEase (SPEC §5).

Each wraps a data-free base spec (`HiggsConfig`, `RTNConfig` or `NF4Config`): the base fixes the
grid, the rotation (HIGGS: block Hadamard; RTN/NF4: none), the padding and the scales exactly as
the data-free quantizer would, so the result is an ordinary `HiggsTensor` that the same kernels
read. The method only changes which grid point each p-vector gets, using the layer's input second
moment Sigma = X^T X.

Like the base specs these are hashable and validated on construction (ValueError naming the value).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from higgs_jax.config import HiggsConfig, NF4Config, QuantSpec, RTNConfig

_BASE_TYPES = (HiggsConfig, RTNConfig, NF4Config)
QUANTEASE_INITS = ("gptq", "rtn")


def _check_base(base) -> None:
    if not isinstance(base, _BASE_TYPES):
        raise ValueError(  # noqa: TRY004
            f"base must be a HiggsConfig, RTNConfig or NF4Config, got {base!r}"
        )


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_damp_block(damp, block_size) -> None:
    if not _is_real(damp) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


class _Wrapped:
    """Base-spec pass-throughs shared by both configs (bits, p, grid, group size, scale dtype)."""

    base: QuantSpec

    @property
    def grid(self):
        return self.base.grid

    @property
    def p(self) -> int:
        return self.base.p

    @property
    def bits(self):
        return self.base.bits

    @property
    def scale_dtype(self) -> str:
        return self.base.scale_dtype


@dataclasses.dataclass(frozen=True)
class GPTQConfig(_Wrapped):
    """GPTQ on the base spec's grid with fixed scales (HIGGS+GPTQ for a HiggsConfig base).

    Attributes:
      base: the data-free spec that fixes grid, rotation, padding and scales.
      damp: relative dampening: damp * mean(diag Sigma) is added to Sigma's diagonal (SPEC: 1%).
      block_size: lazy-batch size in rows of K (rounded down to a multiple of p when used).
    """

    base: QuantSpec
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        _check_base(self.base)
        _check_damp_block(self.damp, self.block_size)

    @property
    def method(self) -> str:
        return "gptq"

    def describe(self) -> str:
        return f"GPTQ[{self.base.describe()}] damp={self.damp:g}"


@dataclasses.dataclass(frozen=True)
class QuantEaseConfig(_Wrapped):
    """QuantEase coordinate descent on the base spec's grid with fixed scales.

    Attributes:
      base: the data-free spec that fixes grid, rotation, padding and scales.
      num_sweeps: cyclic sweeps over K (each costs about one GPTQ pass).
      init: warm start: "gptq" (GPTQ codes, default) or "rtn" (data-free nearest rounding).
      outlier_fraction: None, or the fraction of weights kept as full-precision sparse outliers
        (W ~ W_hat + S), in (0, 0.5); 0.01 is the usual choice. Outliers live in the original
        (unrotated) domain and are stored in the tensor's outlier leaves (counted in bits/weight).
      outlier_iters: rounds of (IHT on S, one code sweep) after the plain sweeps (outliers only).
      iht_steps: iterative-hard-thresholding steps per round (outliers only).
      damp, block_size: GPTQ settings of the warm start (init="gptq").
    """

    base: QuantSpec
    num_sweeps: int = 20
    init: Literal["gptq", "rtn"] = "gptq"
    outlier_fraction: float | None = None
    outlier_iters: int = 10
    iht_steps: int = 5
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        _check_base(self.base)
        if not _is_int(self.num_sweeps) or self.num_sweeps < 0:
            raise ValueError(f"num_sweeps must be an integer >= 0, got {self.num_sweeps!r}")
        if self.init not in QUANTEASE_INITS:
            raise ValueError(f"init must be one of {QUANTEASE_INITS}, got {self.init!r}")
        if self.outlier_fraction is not None:
            f = self.outlier_fraction
            if not _is_real(f) or not math.isfinite(f) or not 0.0 < f < 0.5:
                raise ValueError(f"outlier_fraction must be a number in (0, 0.5), got {f!r}")
        for name in ("outlier_iters", "iht_steps"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        _check_damp_block(self.damp, self.block_size)

    @property
    def method(self) -> str:
        return "quantease"

    def describe(self) -> str:
        out = f"QuantEase[{self.base.describe()}] sweeps={self.num_sweeps} init={self.init}"
        if self.outlier_fraction is not None:
            out += f" outliers={self.outlier_fraction:g}"
        return out


DatawiseSpec = GPTQConfig | QuantEaseConfig
DATAWISE_TYPES = (GPTQConfig, QuantEaseConfig)
PLAIN_TYPES = _BASE_TYPES


def base_spec(spec) -> QuantSpec:
    """The data-free spec behind `spec` (itself for a plain spec)."""
    return spec.base if isinstance(spec, DATAWISE_TYPES) else spec


def is_datawise(spec) -> bool:
    return isinstance(spec, DATAWISE_TYPES)
