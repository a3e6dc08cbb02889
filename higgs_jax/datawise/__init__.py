"""Data-aware quantization with a fixed grid and fixed scales: GPTQ and QuantEase (SPEC §5).

Both work on a ``(K, N)`` kernel and the ``(K, K)`` input second moment ``Sigma = X^T X`` in the same
domain (the caller rotates both with the same block Hadamard for HIGGS, or leaves them unrotated for
RTN/NF4 scalar grids) and return grid codes ``(K/p, N)`` in the `HiggsTensor` layout.
"""

from higgs_jax.datawise.gptq import (
    GPTQInfo,
    dequantize_codes,
    gptq_quantize,
    hessian_objective,
    nearest_grid_code,
)
from higgs_jax.datawise.pipeline import (
    datawise_plan,
    plan_datawise,
    quantize_datawise,
    quantize_params_datawise,
)
from higgs_jax.datawise.quantease import QuantEaseInfo, quantease_quantize
from higgs_jax.datawise.specs import GPTQConfig, QuantEaseConfig

__all__ = [
    "GPTQConfig",
    "GPTQInfo",
    "QuantEaseConfig",
    "QuantEaseInfo",
    "datawise_plan",
    "dequantize_codes",
    "gptq_quantize",
    "hessian_objective",
    "nearest_grid_code",
    "plan_datawise",
    "quantease_quantize",
    "quantize_datawise",
    "quantize_params_datawise",
]
