"""GGUF (llama.cpp) checkpoints -> Llama params tree, dequantized through the `gguf` package.

GGUF stores a matrix of torch shape (out, in) with ggml dims ``(in, out)``; `gguf.quants.dequantize`
returns the torch (out, in) array, which is transposed to the Flax (in, out) kernel. llama.cpp's
converter permutes the rows of ``attn_q`` / ``attn_k`` for the ``llama`` architecture (interleaved
RoPE pairs): within each head, row ``2j + s`` of the file is row ``s * hd/2 + j`` of the HF
rotate-half layout. `unpermute_qk` undoes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax.models.llama import LlamaConfig, Params, RopeScaling, param_shapes

SUPPORTED_ARCHITECTURES = ("llama",)


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation. ``w``: (d_out, d_in) or bias (d_out,)."""
    d_out = w.shape[0]
    rest = w.shape[1:]
    return (
        w.reshape(num_heads, d_out // num_heads // 2, 2, *rest).swapaxes(1, 2).reshape(d_out, *rest)
    )


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def gguf_config(reader: gguf.GGUFReader) -> LlamaConfig:
    """Builds a `LlamaConfig` from GGUF metadata (``{arch}.*`` keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF rope_freqs (per-frequency RoPE factors) are not supported")

    def req(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    if "token_embd.weight" not in names:
        raise ValueError("GGUF file lacks tensor 'token_embd.weight'")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = int(names["token_embd.weight"].shape[-1])
    head_dim = _field(reader, f"{arch}.attention.key_length") or _field(
        reader, f"{arch}.rope.dimension_count"
    )
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type in ("none", None):
        rope_scaling = None
    elif scaling_type == "linear":
        rope_scaling = RopeScaling("linear", float(req("rope.scaling.factor")))
    else:
        raise ValueError(f"unsupported GGUF rope scaling type {scaling_type!r}")
    eps = float(req("attention.layer_norm_rms_epsilon"))
    attn_bias = "blk.0.attn_q.bias" in names
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_layers=int(req("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(head_dim or hidden // heads),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        # stored as float32: round away the float32 representation error (1e-5 -> 9.99999975e-06)
        rms_norm_eps=float(f"{eps:.7g}"),
        max_position_embeddings=int(req("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=attn_bias,
        attention_out_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        rope_scaling=rope_scaling,
        bos_token_id=_opt_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_opt_int(_field(reader, "tokenizer.ggml.eos_token_id")),
    )


def _gguf_name(keys: tuple[str, ...]) -> str:
    leaf = "bias" if keys[-1] == "bias" else "weight"
    top = keys[0]
    if top == "embed_tokens":
        return "token_embd.weight"
    if top == "final_norm":
        return "output_norm.weight"
    if top == "lm_head":
        return "output.weight"
    layer = int(top.removeprefix("layers_"))
    sub = {
        "input_norm": "attn_norm",
        "post_attn_norm": "ffn_norm",
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }[keys[2] if keys[1] in ("attn", "mlp") else keys[1]]
    return f"blk.{layer}.{sub}.{leaf}"


def load_gguf(path: str | Path, dtype: Any = jnp.float32) -> tuple[Params, LlamaConfig]:
    """Loads and dequantizes a llama-architecture GGUF file.

    Tensors of any type `gguf.quants.dequantize` handles are accepted (tested: F32, Q4_1, Q8_0;
    also F16, BF16, Q4_0, ...); others raise ValueError naming the tensor.

    Returns:
        ``(params, config)`` with q/k rows in HF rotate-half order.

    Raises:
        ValueError: unsupported architecture or tensor type; missing, unexpected or misshaped tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    reader = gguf.GGUFReader(path)
    config = gguf_config(reader)
    shapes = param_shapes(config)
    expected = {}
    for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(k.key for k in p)
        expected[_gguf_name(keys)] = (keys, s.shape)
    tensors = {t.name: t for t in reader.tensors}
    missing = sorted(set(expected) - tensors.keys())
    unexpected = sorted(tensors.keys() - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"GGUF {path} does not match its metadata: missing tensors: {missing}; "
            f"unexpected tensors: {unexpected}"
        )
    params: Params = {}
    misshaped = []
    for name, (keys, want) in expected.items():
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"tensor {name!r} has unsupported GGUF type {t.tensor_type.name}"
            ) from e
        w = np.asarray(w, dtype=np.float32)
        logical = tuple(int(d) for d in t.shape[::-1])  # ggml dims are innermost-first
        if w.shape != logical:
            w = w.reshape(logical)
        is_kernel = keys[-1] == "kernel"
        hf_want = want[::-1] if is_kernel else want
        if w.shape != hf_want:
            misshaped.append(f"{name}: expected {hf_want}, got {w.shape}")
            continue
        if keys[-2] in ("q_proj", "k_proj"):
            w = unpermute_qk(w, config.num_heads if keys[-2] == "q_proj" else config.num_kv_heads)
        arr = jnp.asarray(w.T if is_kernel else w, dtype=dtype)
        node = params
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = arr
    if misshaped:
        raise ValueError(f"GGUF {path} has misshaped tensors: " + "; ".join(misshaped))
    return params, config
