"""HuggingFace safetensors checkpoints -> Llama params tree (Flax layout).

A HF directory holds ``config.json`` and either ``model.safetensors`` or several shards listed by
``model.safetensors.index.json``. Torch linear weights are (out, in); Flax kernels are (in, out), so
every ``*_proj.weight`` / ``lm_head.weight`` is transposed. Tensors are read one at a time
(``safe_open``), so peak host memory stays near the size of the model in the target dtype.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import safe_open

from higgs_jax.models.llama import LlamaConfig, Params, param_shapes

# Buffers some exporters save that carry no learned information.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_name_map(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF tensor name -> (params path, transpose?) for every tensor the model needs."""
    out: dict[str, tuple[tuple[str, ...], bool]] = {}
    shapes = param_shapes(config)
    for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(p.key for p in path)
        out[_hf_name(keys)] = (keys, keys[-1] == "kernel")
    return out


def _hf_name(keys: tuple[str, ...]) -> str:
    leaf = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}[keys[-1]]
    top = keys[0]
    if top == "embed_tokens":
        return "model.embed_tokens.weight"
    if top == "final_norm":
        return "model.norm.weight"
    if top == "lm_head":
        return "lm_head.weight"
    layer = int(top.removeprefix("layers_"))
    sub = {
        "input_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "attn": "self_attn",
        "mlp": "mlp",
    }[keys[1]]
    mid = f"{sub}.{keys[2]}" if keys[1] in ("attn", "mlp") else sub
    return f"model.layers.{layer}.{mid}.{leaf}"


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> shard file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / fname for name, fname in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="flax") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name in out:
                    raise ValueError(f"tensor {name!r} appears in both {out[name]} and {f}")
                out[name] = f
    return out


def load_hf_config(path: str | Path) -> LlamaConfig:
    """Reads ``config.json`` of a HF directory into a `LlamaConfig`."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json")
    return LlamaConfig.from_hf_dict(json.loads(cfg_file.read_text()))


def load_hf(path: str | Path, dtype: Any = jnp.float32) -> tuple[Params, LlamaConfig]:
    """Loads a HF Llama-family checkpoint directory.

    Args:
        path: Directory with ``config.json`` and ``*.safetensors`` (optionally sharded with
            ``model.safetensors.index.json``).
        dtype: dtype of the returned arrays.

    Returns:
        ``(params, config)``.

    Raises:
        ValueError: naming missing, unexpected or misshaped tensors. A tied-embedding checkpoint
            may also store ``lm_head.weight`` (ignored); ``rotary_emb.inv_freq`` buffers are ignored.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"HF checkpoint path {path} is not a directory")
    config = load_hf_config(path)
    expected = hf_name_map(config)
    shapes = param_shapes(config)
    files = _tensor_files(path)

    ignored = {n for n in files if _IGNORED.match(n)}
    if config.tie_word_embeddings:
        ignored |= {"lm_head.weight"} & files.keys()
    missing = sorted(set(expected) - files.keys())
    unexpected = sorted(files.keys() - set(expected) - ignored)
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if problems:
        raise ValueError(
            f"checkpoint {path} does not match its config.json: " + "; ".join(problems)
        )

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)

    params: Params = {}
    misshaped = []
    for fname, names in by_file.items():
        with safe_open(fname, framework="flax") as fh:
            for name in names:
                keys, transpose = expected[name]
                want = _get(shapes, keys).shape
                got = tuple(fh.get_slice(name).get_shape())
                hf_want = want[::-1] if transpose else want
                if got != hf_want:
                    misshaped.append(f"{name}: expected {hf_want}, got {got}")
                    continue
                t = jnp.asarray(fh.get_tensor(name))
                t = (t.T if transpose else t).astype(dtype)
                _set(params, keys, t)
    if misshaped:
        raise ValueError(f"checkpoint {path} has misshaped tensors: " + "; ".join(misshaped))
    return params, config


def _get(tree: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _set(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value
