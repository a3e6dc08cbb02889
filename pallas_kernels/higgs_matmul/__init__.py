"""HIGGS quantized matmul on NVIDIA GPUs (Pallas, Triton backend).

Public entry points (called lazily by `higgs_jax.matmul`):
`higgs_matmul_pallas`, `can_use_pallas`, `higgs_matmul_reference`, `Config`, `default_config`,
`autotune`, `repack` / `KernelPackedWeight`.
"""

from pallas_kernels.higgs_matmul.autotune import autotune, load_autotune_cache, save_autotune_cache
from pallas_kernels.higgs_matmul.config import Config, candidate_configs, default_config
from pallas_kernels.higgs_matmul.reference import higgs_matmul_reference
from pallas_kernels.higgs_matmul.repack import KernelPackedWeight, from_arrays, repack
from pallas_kernels.higgs_matmul.wrapper import can_use_pallas, higgs_matmul_pallas

__all__ = [
    "Config",
    "KernelPackedWeight",
    "autotune",
    "can_use_pallas",
    "candidate_configs",
    "default_config",
    "from_arrays",
    "higgs_matmul_pallas",
    "higgs_matmul_reference",
    "load_autotune_cache",
    "repack",
    "save_autotune_cache",
]
