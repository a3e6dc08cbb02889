"""Calibration statistics for data-aware quantization: windows, block passes, Sigma, the Sigma cache.

Glossary: B = samples per batch, T = seqlen, D = hidden size, K = a linear layer's input dim,
tap = a named linear-layer input inside a decoder block (`models.llama.LINEAR_INPUTS`: q/k/v read
``attn_in``, o_proj ``attn_out``, gate/up ``mlp_in``, down ``mlp_act``; the LM head reads
``final_norm_out``), Sigma = X^T X (K, K) summed over every calibration token (float32).

The model is run block by block on the calibration windows (`embed`, `block_sigma`,
`block_forward`): memory holds the hidden states of all samples (num_samples * T * D floats), one
batch of activations, and the Sigma of the taps being accumulated (K^2 floats each), never all the
activations of a layer. `higgs_jax.datawise.pipeline` drives these passes sequentially (each block
sees the outputs of the already-quantized blocks before it).

Sigma cache: ``sigmas.npz`` (one array per ``layers_i.tap``) + ``sigmas.json`` (metadata: model
fingerprint, calibration text hash, num_samples, seqlen, seed, the quantization plan that produced
the sequential statistics, ...). `load_sigmas` refuses a cache whose metadata differs from what the
caller expects, naming the first mismatching field.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax.models.llama import LlamaConfig, decoder_block, rms_norm

SIGMA_FILE = "sigmas.npz"
META_FILE = "sigmas.json"
CACHE_FORMAT = 1
LM_HEAD_TAP = "final_norm_out"
#: Taps of one decoder block in the order the block computes them.
BLOCK_TAPS = ("attn_in", "attn_out", "mlp_in", "mlp_act")

_HI = jax.lax.Precision.HIGHEST


def default_calibration_file() -> Path | None:
    """WikiText-2 *validation* text of the development workspace, if present (never the test split)."""
    p = (
        Path(__file__).resolve().parents[3]
        / "shared"
        / "data"
        / "text"
        / "wikitext2_valid_tokenized.txt"
    )
    return p if p.is_file() else None


def sample_windows(tokens: Any, num_samples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """`num_samples` windows of `seqlen` tokens at distinct random starts (seeded).

    Args:
      tokens: 1-D int token stream of the calibration text.
      num_samples: number of windows (>= 1).
      seqlen: tokens per window (>= 2).
      seed: seed of the start positions (numpy PCG64).

    Returns:
      int32 array (num_samples, seqlen).

    Raises:
      ValueError: bad arguments, or a text too short to hold `num_samples` windows of `seqlen`
        tokens at distinct starts.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"calibration tokens must be a 1-D integer stream, got {tokens.dtype} {tokens.shape}"
        )
    for name, v, lo in (("num_samples", num_samples, 1), ("seqlen", seqlen, 2)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    starts = tokens.shape[0] - seqlen + 1
    if starts < num_samples:
        raise ValueError(
            f"calibration text too short: {tokens.shape[0]} tokens give {max(starts, 0)} distinct "
            f"windows of seqlen={seqlen}, but num_samples={num_samples} were requested (use a longer "
            "text, fewer samples or a shorter seqlen)"
        )
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(starts, size=num_samples, replace=False))
    return np.stack([tokens[i : i + seqlen] for i in idx]).astype(np.int32)


def tokens_hash(tokens: Any) -> str:
    """sha256 of the token stream (int32 bytes): identifies the calibration text as tokenized."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(tokens, np.int32)).tobytes()).hexdigest()


def model_fingerprint(params: Mapping[str, Any], config: LlamaConfig) -> str:
    """A short hash of the model: its config plus the squared norms of a few weights.

    Uses the embedding and the kernels of the first and last block (enough to tell checkpoints
    apart, cheap even for large models).
    """
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    probes = [("embed_tokens", params["embed_tokens"]["embedding"])]
    for i in sorted({0, config.num_layers - 1}):
        leaves = jax.tree_util.tree_leaves_with_path(params[f"layers_{i}"])
        probes += [
            (f"layers_{i}{jax.tree_util.keystr(p)}", x) for p, x in leaves if np.ndim(x) == 2
        ]
    for name, x in probes:
        x = jnp.asarray(x, jnp.float32)
        h.update(f"{name}:{float(jnp.sum(x * x)):.6e};".encode())
    return h.hexdigest()[:16]


def positions_and_mask(b: int, t: int) -> tuple[jax.Array, jax.Array]:
    """RoPE positions (B, T) and the causal mask (B, T, T) of `llama.forward` without a cache."""
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], (b, t, t))
    return positions, mask


def embed(params: Mapping[str, Any], tokens: jax.Array, dtype: Any = jnp.float32):
    """(h (B, T, D), positions (B, T), causal mask (B, T, T)) exactly as `llama.forward` builds them."""
    positions, mask = positions_and_mask(*tokens.shape)
    h = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(dtype)
    return h, positions, mask


def _xtx(x: jax.Array) -> jax.Array:
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return jnp.matmul(x.T, x, precision=_HI)


@functools.partial(jax.jit, static_argnames=("config", "taps", "dtype"), donate_argnames=("acc",))
def block_sigma(lp, h, acc, *, config: LlamaConfig, taps: tuple[str, ...], dtype=jnp.float32):
    """acc[tap] + X_tap^T X_tap for one batch of hidden states `h` (B, T, D) entering block `lp`."""
    b, t = h.shape[:2]
    positions, mask = positions_and_mask(b, t)
    _, _, cap = decoder_block(
        lp, h, config, positions=positions, mask=mask, dtype=dtype, capture=True
    )
    return {tap: acc[tap] + _xtx(cap[tap]) for tap in taps}


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def block_forward(lp, h, *, config: LlamaConfig, dtype=jnp.float32):
    """The block's output hidden states for `h` (B, T, D)."""
    b, t = h.shape[:2]
    positions, mask = positions_and_mask(b, t)
    out, _, _ = decoder_block(lp, h, config, positions=positions, mask=mask, dtype=dtype)
    return out


@functools.partial(jax.jit, static_argnames=("eps",), donate_argnames=("acc",))
def final_norm_sigma(scale, h, acc, *, eps: float):
    """acc + X^T X for the LM head input X = rms_norm(h)."""
    return acc + _xtx(rms_norm(h, scale, eps))


@functools.partial(jax.jit, static_argnames=("dtype",))
def embed_batch(embedding, tokens, *, dtype=jnp.float32):
    return jnp.take(embedding, tokens, axis=0).astype(dtype)


def tap_dims(config: LlamaConfig) -> dict[str, int]:
    """K of every tap."""
    return {
        "attn_in": config.hidden_size,
        "attn_out": config.q_dim,
        "mlp_in": config.hidden_size,
        "mlp_act": config.intermediate_size,
        LM_HEAD_TAP: config.hidden_size,
    }


# ----------------------------------------------------------------------------- cache


def save_sigmas(
    directory: str | Path, sigmas: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Path:
    """Writes ``sigmas.npz`` + ``sigmas.json`` into `directory` (created if needed).

    Args:
      directory: cache directory.
      sigmas: ``{"layers_i.tap": (K, K) float32}`` (summed X^T X).
      meta: JSON-serialisable metadata; compared field by field by `load_sigmas`.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, np.float32) for k, v in sigmas.items()}
    np.savez(d / SIGMA_FILE, **arrays)
    info = {"format": CACHE_FORMAT, **dict(meta), "keys": sorted(arrays)}
    (d / META_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
    return d


def cache_exists(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / SIGMA_FILE).is_file() and (d / META_FILE).is_file()


def load_sigmas(
    directory: str | Path, expected: Mapping[str, Any] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a cache written by `save_sigmas`.

    Args:
      directory: cache directory.
      expected: metadata the caller needs; every field present here must equal the stored one.

    Returns:
      (sigmas, metadata).

    Raises:
      ValueError: missing files, unknown format, or a metadata field that differs from `expected`
        (the message names the field and both values).
    """
    d = Path(directory)
    if not cache_exists(d):
        raise ValueError(f"{d} holds no Sigma cache ({SIGMA_FILE} + {META_FILE})")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"Sigma cache {d}: format {meta.get('format')!r} is not {CACHE_FORMAT}")
    for field, want in (expected or {}).items():
        got = meta.get(field, "<missing>")
        if _jsonable(got) != _jsonable(want):
            raise ValueError(
                f"Sigma cache {d} does not match: field {field!r} is {got!r} in the cache but "
                f"{want!r} was requested (delete the cache or use another cache_dir)"
            )
    with np.load(d / SIGMA_FILE) as z:
        sigmas = {k: np.asarray(z[k]) for k in z.files}
    missing = sorted(set(meta.get("keys", [])) - set(sigmas))
    if missing:
        raise ValueError(f"Sigma cache {d} is incomplete: missing {missing[:4]}")
    return sigmas, meta


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=str))
