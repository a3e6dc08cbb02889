"""Model definitions as pure functions of params pytrees."""

from higgs_jax.models.llama import (
    LlamaConfig,
    RopeScaling,
    forward,
    generate,
    init_cache,
    param_shapes,
    random_params,
)

__all__ = [
    "LlamaConfig",
    "RopeScaling",
    "forward",
    "generate",
    "init_cache",
    "param_shapes",
    "random_params",
]
