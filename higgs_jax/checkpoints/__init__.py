"""Checkpoint loaders: HF safetensors directories and GGUF files -> (params, LlamaConfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from higgs_jax.checkpoints.gguf import load_gguf
from higgs_jax.checkpoints.hf import load_hf
from higgs_jax.models.llama import LlamaConfig, Params


def load_checkpoint(path: str | Path, dtype: Any = jnp.float32) -> tuple[Params, LlamaConfig]:
    """Loads a HF directory (``config.json`` + safetensors) or a ``.gguf`` file.

    Raises:
        ValueError: if ``path`` is neither.
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"directory {p} has no config.json (not a HF checkpoint)")
        return load_hf(p, dtype)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, dtype)
    raise ValueError(f"{p} is neither a HF checkpoint directory nor an existing .gguf file")


__all__ = ["load_checkpoint", "load_gguf", "load_hf"]
