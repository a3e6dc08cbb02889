"""Llama-family decoder (Llama, Mistral without sliding window, Qwen2) as pure functions of a params tree.

Glossary: B = batch, T = new tokens in this call, S = key length (T, or the cache length),
D = hidden size, F = MLP width, V = vocabulary, Hq / Hkv = query / key-value heads,
G = Hq // Hkv (queries per key-value head, grouped-query attention), hd = head dim.

The params tree is a plain nested dict in Flax layout (kernels are (in, out)):

```
{'embed_tokens': {'embedding': (V, D)},
 'layers_{i}': {'input_norm': {'scale': (D,)},
                'attn': {'q_proj': {'kernel': (D, Hq*hd), ['bias']}, 'k_proj': {'kernel': (D, Hkv*hd)},
                         'v_proj': {'kernel': (D, Hkv*hd)}, 'o_proj': {'kernel': (Hq*hd, D)}},
                'post_attn_norm': {'scale': (D,)},
                'mlp': {'gate_proj': {'kernel': (D, F)}, 'up_proj': {'kernel': (D, F)},
                        'down_proj': {'kernel': (F, D)}}},
 'final_norm': {'scale': (D,)},
 ['lm_head': {'kernel': (D, V)}]}      # absent when embeddings are tied (logits = h @ embedding.T)
```

Every linear layer goes through `higgs_jax.matmul.linear`, so a kernel may be a plain array or a
quantized `HiggsTensor` leaf; biases are always applied when present. For inference a block may
instead hold the fused ``attn/qkv_proj`` (D, (Hq + 2 Hkv) hd) and ``mlp/gate_up_proj`` (D, 2F)
made by `higgs_jax.fuse.fuse_projections` (one matmul per shared input); the block splits their
outputs by the config's widths.

RoPE uses the rotate-half convention (HF layout): for a head vector x = [x1, x2] (halves),
rope(x) = x * cos + [-x2, x1] * sin with angles pos * theta^(-2i/hd), i < hd/2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax.matmul import linear
from higgs_jax.norms import rms_norm

Params = dict[str, Any]
Cache = dict[str, Any]

_SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_SUPPORTED_MODEL_TYPES = frozenset(_SUPPORTED_ARCHITECTURES.values())


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    Attributes:
        rope_type: ``"linear"`` (positions divided by ``factor``) or ``"llama3"`` (Llama 3.1:
            low frequencies divided by ``factor``, high ones kept, smooth interpolation between).
        factor: Scaling factor.
        low_freq_factor: llama3 only.
        high_freq_factor: llama3 only.
        original_max_position_embeddings: llama3 only: the pre-extension context length.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (hashable: usable as a jit static argument).

    ``attention_bias`` adds biases to q/k/v projections; ``attention_out_bias`` to o_proj
    (Llama: both equal ``attention_bias``; Qwen2: q/k/v biased, o_proj not).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Accept the plain-dict / list forms `dataclasses.asdict` + JSON produce, so that
        # `LlamaConfig(**json.loads(...))` round-trips and the config stays hashable.
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from a HuggingFace ``config.json`` dict.

        Raises:
            ValueError: for unsupported architectures / model types, activations, sliding-window
                attention, or RoPE scaling types other than default, linear and llama3.
        """
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        for arch in archs:
            if arch not in _SUPPORTED_ARCHITECTURES:
                raise ValueError(
                    f"unsupported architecture {arch!r}; supported: {sorted(_SUPPORTED_ARCHITECTURES)}"
                )
        if model_type is None and archs:
            model_type = _SUPPORTED_ARCHITECTURES[archs[0]]
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {sorted(_SUPPORTED_MODEL_TYPES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is supported")
        window = cfg.get("sliding_window")
        uses_window = cfg.get("use_sliding_window", model_type == "mistral")
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        if window is not None and uses_window and int(window) < max_pos:
            raise ValueError(
                f"sliding-window attention (sliding_window={window} < max_position_embeddings="
                f"{max_pos}) is not supported"
            )
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling")
        if scaling:
            rope.update(scaling)
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in (None, "default"):
            rope_scaling = None
        elif rope_type == "linear":
            rope_scaling = RopeScaling("linear", float(rope["factor"]))
        elif rope_type == "llama3":
            rope_scaling = RopeScaling(
                "llama3",
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        else:
            raise ValueError(
                f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3"
            )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )


# ----------------------------------------------------------------------------- params


def param_shapes(config: LlamaConfig, dtype: Any = jnp.float32) -> Params:
    """The params tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (no memory touched)."""
    c = config
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size

    def lin(n_in: int, n_out: int, bias: bool) -> dict[str, jax.ShapeDtypeStruct]:
        out = {"kernel": jax.ShapeDtypeStruct((n_in, n_out), dtype)}
        if bias:
            out["bias"] = jax.ShapeDtypeStruct((n_out,), dtype)
        return out

    def norm() -> dict[str, jax.ShapeDtypeStruct]:
        return {"scale": jax.ShapeDtypeStruct((D,), dtype)}

    params: Params = {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((V, D), dtype)}}
    for i in range(c.num_layers):
        params[f"layers_{i}"] = {
            "input_norm": norm(),
            "attn": {
                "q_proj": lin(D, c.q_dim, c.attention_bias),
                "k_proj": lin(D, c.kv_dim, c.attention_bias),
                "v_proj": lin(D, c.kv_dim, c.attention_bias),
                "o_proj": lin(c.q_dim, D, c.attention_out_bias),
            },
            "post_attn_norm": norm(),
            "mlp": {
                "gate_proj": lin(D, F, c.mlp_bias),
                "up_proj": lin(D, F, c.mlp_bias),
                "down_proj": lin(F, D, c.mlp_bias),
            },
        }
    params["final_norm"] = norm()
    if not c.tie_word_embeddings:
        params["lm_head"] = {"kernel": jax.ShapeDtypeStruct((D, V), dtype)}
    return params


def random_params(config: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random params for tests and benchmarks.

    Kernels ~ N(0, 1/in_dim), embeddings ~ N(0, 1), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2).
    Deterministic in ``key`` (one draw, split over the leaves in sorted-path order); jit-compiled
    once per (config, dtype).
    """
    return _random_params_jit(config, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _random_params_jit(config: LlamaConfig, key: jax.Array, dtype: Any) -> Params:
    # One normal draw sliced into leaves: a single RNG op compiles far faster than one per leaf.
    shapes = param_shapes(config, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [math.prod(s.shape) for _, s in leaves]
    z = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, offset = [], 0
    for (path, s), size in zip(leaves, sizes):
        v = z[offset : offset + size].reshape(s.shape)
        offset += size
        name = path[-1].key
        if name == "kernel":
            v = v / math.sqrt(s.shape[0])
        elif name == "bias":
            v = 0.1 * v
        elif name == "scale":
            v = 1.0 + 0.1 * v
        out.append(v.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- layers


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, with the config's RoPE scaling (float64)."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = config.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    # llama3: wavelengths longer than old_len / low_freq_factor are slowed by `factor`, shorter
    # than old_len / high_freq_factor kept, and the band between interpolated linearly in
    # old_len / wavelength.
    wavelen = 2 * np.pi / inv
    old = rs.original_max_position_embeddings
    ratio = old / wavelen
    smooth = (ratio - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smooth = np.clip(smooth, 0.0, 1.0)
    return (1 - smooth) * inv / rs.factor + smooth * inv


def _rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Applies rotate-half RoPE. x: (B, T, H, hd); positions: (B, T) int."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(
        inv_freq, jnp.float32
    )  # (B,T,hd/2)
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear(x: jax.Array, p: Mapping[str, Any]) -> jax.Array:
    return linear(x, p["kernel"], p.get("bias"))


def _normed_linear(h: jax.Array, norm: Mapping[str, Any], eps: float, p: Mapping[str, Any]):
    """``rms_norm(h) @ kernel (+ bias)``: one call, so the Pallas path may normalise inside its
    rotation kernel (`higgs_jax.matmul.linear`, `Config.norm`); otherwise `rms_norm` first."""
    return linear(h, p["kernel"], p.get("bias"), norm_scale=norm["scale"], norm_eps=eps)


def _attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, num_kv_heads: int
) -> jax.Array:
    """Grouped-query attention. q: (B,T,Hq,hd); k, v: (B,S,Hkv,hd); mask: bool (B,T,S)."""
    B, T, Hq, hd = q.shape
    G = Hq // num_kv_heads
    qg = q.reshape(B, T, num_kv_heads, G, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq * hd).astype(q.dtype)


#: How a one-token decode step with a KV cache runs attention (`forward(..., attention=)`):
#: "auto" = the Pallas decode-attention kernel (`pallas_kernels.decode_attention`: cache update,
#: masked softmax and both products in one launch) on a supported NVIDIA GPU, XLA elsewhere;
#: "xla"; "pallas" (an error where it cannot run); "interpret" (the kernel in Pallas interpret
#: mode, for CPU tests). Prefill (T > 1) always takes the XLA path.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "pallas", "interpret")


def _kernel_decode_attention(q, k, v, layer_cache, start, mask, impl: str):
    """The decode-attention kernel for T = 1 when ``impl`` picks it, else None (the XLA path).
    q: (B, 1, Hq, hd), k/v: (B, 1, Hkv, hd) after RoPE; mask (B, 1, S)."""
    if impl == "xla":
        return None
    try:
        from pallas_kernels import decode_attention as da
    except ImportError:
        if impl == "auto":
            return None
        raise
    args = (q[:, 0], k[:, 0], v[:, 0], layer_cache["k"], layer_cache["v"], start, mask[:, 0])
    if impl == "interpret":
        return da.decode_attention(*args, interpret=True)
    if impl == "auto" and not da.can_use_pallas(args[0], args[3])[0]:
        return None
    return da.decode_attention(*args, implementation="pallas")


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}"
        )


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache for ``max_len`` positions.

    Layout: ``{'layers_i': {'k': (B, max_len, Hkv, hd), 'v': ...}, 'index': int32 scalar}``;
    ``index`` is the number of cache slots already written.
    """
    if max_len > config.max_position_embeddings:
        raise ValueError(
            f"cache max_len={max_len} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    cache: Cache = {
        f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for i in range(config.num_layers)
    }
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


#: Inputs of the linear layers of one block, keyed by the params path inside the block; the
#: layers that read the same input share it (q/k/v read ``attn_in``, gate/up read ``mlp_in``).
LINEAR_INPUTS = {
    "attn/q_proj": "attn_in", "attn/k_proj": "attn_in", "attn/v_proj": "attn_in",
    "attn/o_proj": "attn_out", "mlp/gate_proj": "mlp_in", "mlp/up_proj": "mlp_in",
    "mlp/down_proj": "mlp_act",
}


def decoder_block(
    lp: Params,
    h: jax.Array,
    config: LlamaConfig,
    *,
    positions: jax.Array,
    mask: jax.Array,
    layer_cache: Mapping[str, jax.Array] | None = None,
    start: jax.Array | int = 0,
    dtype: Any = jnp.float32,
    capture: bool = False,
    attention: str = "auto",
) -> tuple[jax.Array, dict | None, dict | None]:
    """One pre-norm decoder block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``.

    Args:
        lp: the block's params (``layers_i`` subtree).
        h: (B, T, D) residual stream.
        config: model config.
        positions: (B, T) RoPE positions.
        mask: bool (B, T, S) attention mask over key slots.
        layer_cache: this block's ``{'k', 'v'}`` cache, or None.
        start: first cache slot written.
        dtype: compute dtype.
        capture: also return the inputs of the block's linear layers (see `LINEAR_INPUTS`), for
            calibration statistics (GPTQ / QuantEase Hessians).
        attention: decode-step attention implementation (`ATTENTION_IMPLEMENTATIONS`).

    Returns:
        ``(h_out, new_layer_cache or None, captured inputs or None)``.
    """
    c = config
    B, T = h.shape[:2]
    inv_freq = rope_inv_freq(c)
    taps: dict | None = {} if capture else None
    eps = c.rms_norm_eps
    ap = lp["attn"]
    if "qkv_proj" in ap:  # fused at load time (higgs_jax.fuse): one matmul, split by width
        qkv = _normed_linear(h, lp["input_norm"], eps, ap["qkv_proj"])
        q, k, v = jnp.split(qkv, [c.q_dim, c.q_dim + c.kv_dim], axis=-1)
    else:
        q, k, v = (
            _normed_linear(h, lp["input_norm"], eps, ap[n]) for n in ("q_proj", "k_proj", "v_proj")
        )
    q = q.reshape(B, T, c.num_heads, c.head_dim)
    k = k.reshape(B, T, c.num_kv_heads, c.head_dim)
    v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
    q = _rope(q, positions, inv_freq)
    k = _rope(k, positions, inv_freq)
    new_lc = None
    fused = None
    if layer_cache is not None and T == 1:
        fused = _kernel_decode_attention(q, k, v, layer_cache, start, mask, attention)
    if fused is not None:
        a, kc, vc = fused
        new_lc = {"k": kc, "v": vc}
        a = a.reshape(B, T, c.num_heads * c.head_dim)
    elif layer_cache is not None:
        k = jax.lax.dynamic_update_slice(
            layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, start, 0, 0))
        v = jax.lax.dynamic_update_slice(
            layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, start, 0, 0))
        new_lc = {"k": k, "v": v}
        k, v = k.astype(dtype), v.astype(dtype)
    if fused is None:
        a = _attention(q, k, v, mask, c.num_kv_heads)
    h_attn = h  # the residual stream the attention block read
    h = h + _linear(a, ap["o_proj"]).astype(dtype)
    mp, post = lp["mlp"], lp["post_attn_norm"]
    if "gate_up_proj" in mp:  # fused at load time (higgs_jax.fuse)
        gu = _normed_linear(h, post, eps, mp["gate_up_proj"])
        g, u = jnp.split(gu, [c.intermediate_size], axis=-1)
        g = jax.nn.silu(g)
    else:
        g = jax.nn.silu(_normed_linear(h, post, eps, mp["gate_proj"]))
        u = _normed_linear(h, post, eps, mp["up_proj"])
    act = g * u
    if capture:
        taps.update({
            "attn_in": rms_norm(h_attn, lp["input_norm"]["scale"], eps),
            "attn_out": a,
            "mlp_in": rms_norm(h, post["scale"], eps),
            "mlp_act": act,
        })
    h = h + _linear(act, mp["down_proj"]).astype(dtype)
    return h, new_lc, taps


def forward(
    params: Params,
    tokens: jax.Array,
    config: LlamaConfig,
    *,
    positions: jax.Array | None = None,
    cache: Cache | None = None,
    attention_mask: jax.Array | None = None,
    dtype: Any = jnp.float32,
    attention: str = "auto",
) -> tuple[jax.Array, Cache | None]:
    """Runs the decoder.

    Args:
        params: Params tree (see module docstring); kernels may be quantized tensors.
        tokens: int32 (B, T) token ids.
        config: Model config.
        positions: int (B, T) RoPE positions. Default: ``cache['index'] + arange(T)``
            (``arange(T)`` without a cache).
        cache: Optional KV cache from `init_cache`; the T new keys/values are written at slots
            ``[index, index + T)`` and queries attend causally to all slots ``<=`` their own.
        attention_mask: Optional (B, S) bool/int mask of key slots that may be attended
            (S = T without cache, the cache length with one), e.g. to hide left padding.
        dtype: Compute dtype (activations, kernels cast to it); norms, RoPE, softmax and the
            logits are float32.
        attention: how one-token steps with a cache run attention, one of
            `ATTENTION_IMPLEMENTATIONS` ("auto": the Pallas decode-attention kernel on a
            supported NVIDIA GPU, XLA elsewhere). A static argument under jit.

    Returns:
        ``(logits float32 (B, T, V), new_cache)``; ``new_cache`` is None when ``cache`` is None.
    """
    _check_attention(attention)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, seq), got {tokens.shape}")
    c = config
    B, T = tokens.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    if positions is None:
        positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))

    # Causal mask by slot: query t sits at slot start + t.
    q_slot = start + jnp.arange(T)
    S = T if cache is None else cache["layers_0"]["k"].shape[1]
    mask = jnp.arange(S)[None, :] <= q_slot[:, None]  # (T, S)
    mask = jnp.broadcast_to(mask, (B, T, S))
    if attention_mask is not None:
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must have shape {(B, S)}, got {attention_mask.shape}")
        mask = mask & attention_mask.astype(bool)[:, None, :]

    emb = params["embed_tokens"]["embedding"]
    h = jnp.take(emb, tokens, axis=0).astype(dtype)
    new_cache: Cache | None = None if cache is None else {"index": start + T}
    for i in range(c.num_layers):
        layer_cache = None if cache is None else cache[f"layers_{i}"]
        h, lc, _ = decoder_block(params[f"layers_{i}"], h, c, positions=positions, mask=mask,
                                 layer_cache=layer_cache, start=start, dtype=dtype,
                                 attention=attention)
        if cache is not None:
            new_cache[f"layers_{i}"] = lc
    if "lm_head" in params:
        logits = _normed_linear(h, params["final_norm"], c.rms_norm_eps, params["lm_head"])
    else:
        h = rms_norm(h, params["final_norm"]["scale"], c.rms_norm_eps)
        logits = jnp.einsum("btd,vd->btv", h, emb.astype(dtype), preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32), new_cache


# ----------------------------------------------------------------------------- generation


def _sample(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, greedy: bool
) -> jax.Array:
    """Next token ids (B,) from float32 logits (B, V); temperature and top_k are traced."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    V = logits.shape[-1]
    kth = jax.lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), V - top_k, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _generate_impl(
    params, prompt, key, temperature, top_k, config, max_new_tokens, greedy, dtype, cache_len,
    attention,
):
    B, P = prompt.shape
    cache = init_cache(config, B, cache_len, dtype)
    logits, cache = forward(params, prompt, config, cache=cache, dtype=dtype, attention=attention)
    first = _sample(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, greedy)
    out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
        out, cache = carry
        tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        logits, cache = forward(params, tok, config, cache=cache, dtype=dtype, attention=attention)
        nxt = _sample(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k, greedy)
        return out.at[:, i].set(nxt), cache

    out, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache))
    return jnp.concatenate([prompt, out], axis=1)


_generate_jit = jax.jit(
    _generate_impl,
    static_argnames=("config", "max_new_tokens", "greedy", "dtype", "cache_len", "attention"),
)

#: `generate` rounds its KV cache up to a multiple of this many slots (within
#: max_position_embeddings): the decode-attention kernel walks the cache in 64-slot blocks and
#: needs S to be a multiple of 16; the extra slots are masked like every slot past the last token.
CACHE_ROUND = 64


def generate(
    params: Params,
    config: LlamaConfig,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    dtype: Any = jnp.float32,
    attention: str = "auto",
) -> jax.Array:
    """Autoregressive decoding with a KV cache (one jitted prefill + `fori_loop` decode).

    Args:
        params: Params tree.
        config: Model config.
        prompt_tokens: int (B, P) or (P,) prompt ids (no padding; all rows the same length).
        max_new_tokens: Number of tokens to generate (>= 1).
        key: PRNG key; required when ``temperature > 0``.
        temperature: 0 for greedy decoding, else softmax temperature.
        top_k: Sample only among the ``top_k`` most likely tokens (None: all).
        dtype: Compute dtype.
        attention: decode-step attention (`ATTENTION_IMPLEMENTATIONS`; "auto": the Pallas
            kernel on a supported NVIDIA GPU). The cache is rounded up to `CACHE_ROUND` slots.

    Returns:
        int32 (B, P + max_new_tokens) (or (P + max_new_tokens,)): prompt followed by new tokens.
        No early stop at EOS: callers cut at their EOS id.
    """
    _check_attention(attention)
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be (batch, len>0) or (len>0,), got {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, {config.vocab_size}], got {top_k}")
    if key is None:
        key = jax.random.key(0)
    out = _generate_jit(
        params,
        prompt,
        key,
        jnp.float32(max(temperature, 1e-6)),
        jnp.int32(config.vocab_size if top_k is None else top_k),
        config=config,
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0.0,
        dtype=jnp.dtype(dtype),
        cache_len=max(total, min(-(-total // CACHE_ROUND) * CACHE_ROUND,
                                 config.max_position_embeddings)),
        attention=attention,
    )
    return out[0] if squeeze else out
