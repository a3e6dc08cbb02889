"""GPU kernels for higgs-jax (Pallas, Triton backend on NVIDIA GPUs).

Nothing here is imported by `higgs_jax` at import time: `higgs_jax.matmul` imports
`pallas_kernels.higgs_matmul` lazily, so the package never needs a GPU to import.
"""
