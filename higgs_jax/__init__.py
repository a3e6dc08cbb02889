"""higgs-jax: data-free LLM weight quantization (HIGGS) for JAX.

Public API (see README.md for a tour):

    from higgs_jax import HiggsConfig, quantize_params, dequantize_params, higgs_matmul
"""

from higgs_jax.config import HiggsConfig, NF4Config, RTNConfig
from higgs_jax.grids import GridSpec, available_grids
from higgs_jax.matmul import can_use_pallas, higgs_matmul, linear
from higgs_jax.params import (
    DEFAULT_RULES,
    QuantReport,
    Rule,
    dequantize_params,
    plan_quantization,
    quantize_params,
)
from higgs_jax.qtensor import HiggsTensor, dequantize
from higgs_jax.quantize import expected_bits_per_weight, quantize, quantize_with_error

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RULES",
    "GridSpec",
    "HiggsConfig",
    "HiggsTensor",
    "NF4Config",
    "QuantReport",
    "RTNConfig",
    "Rule",
    "available_grids",
    "can_use_pallas",
    "dequantize",
    "dequantize_params",
    "expected_bits_per_weight",
    "higgs_matmul",
    "linear",
    "plan_quantization",
    "quantize",
    "quantize_params",
    "quantize_with_error",
]
