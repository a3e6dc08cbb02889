"""Perplexity evaluation (GPTQ / HIGGS protocol) and tokenization helpers.

Protocol: tokenize the whole text once; cut non-overlapping windows of ``seqlen`` tokens (stride =
seqlen, remainder dropped); run each window independently; PPL = exp(mean cross-entropy over the
``seqlen - 1`` predicted positions of every window).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from higgs_jax.models.llama import LlamaConfig, Params, forward


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Result of `perplexity`.

    Attributes:
        ppl: exp(nll_mean).
        nll_mean: Mean negative log-likelihood (nats) over all predicted tokens.
        num_tokens: Number of predicted tokens (num_windows * (seqlen - 1)).
        num_windows: Number of windows evaluated.
    """

    ppl: float
    nll_mean: float
    num_tokens: int
    num_windows: int


def tokenize_text(tokenizer: Any, text: str, *, bos_id: int | None = None) -> np.ndarray:
    """Tokenizes ``text`` as one stream; prepends ``bos_id`` once if given.

    Accepts a `tokenizers.Tokenizer` or a transformers tokenizer (anything whose ``encode``
    returns ids or an object with ``.ids``). No special tokens are added by this function.
    """
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = enc.ids if hasattr(enc, "ids") else enc
    out = np.asarray(ids, dtype=np.int32)
    if bos_id is not None:
        out = np.concatenate([np.asarray([bos_id], np.int32), out])
    return out


def window_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Summed NLL per window of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (float32)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(tgt, axis=-1)


@functools.partial(jax.jit, static_argnames=("forward_fn",))
def _batch_nll(params: Params, tokens: jax.Array, forward_fn: Callable) -> jax.Array:
    return window_nll(forward_fn(params, tokens), tokens)


@dataclasses.dataclass(frozen=True)
class _ForwardLogits:
    """Hashable ``(params, tokens) -> logits`` for the Llama `forward` (equal configs share a
    jit cache entry, unlike a fresh `functools.partial` per call)."""

    config: LlamaConfig
    dtype: Any

    def __call__(self, params: Params, tokens: jax.Array) -> jax.Array:
        return forward(params, tokens, self.config, dtype=self.dtype)[0]


def perplexity(
    params: Params,
    config: LlamaConfig,
    tokens: np.ndarray | jax.Array,
    *,
    seqlen: int,
    num_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    forward_fn: Callable[[Params, jax.Array], jax.Array] | None = None,
    dtype: Any = jnp.float32,
) -> PerplexityResult:
    """Perplexity of a model on a token stream with non-overlapping windows.

    Args:
        params: Params tree (fp or quantized).
        config: Model config.
        tokens: 1-D int token stream (BOS already included if wanted; see `tokenize_text`).
        seqlen: Window length (tokens per window, >= 2).
        num_windows: Evaluate only the first ``num_windows`` windows (None: all).
        batch_size: Windows per jitted forward call.
        progress: Show a tqdm progress bar.
        forward_fn: ``(params, tokens (B, T)) -> logits (B, T, V)``; must be hashable (a
            module-level function or `functools.partial` of one). Default: `forward` with ``config``.
        dtype: Compute dtype of the default forward.

    Raises:
        ValueError: when the text is shorter than one window, ``seqlen`` exceeds
            ``config.max_position_embeddings``, or more windows are requested than available.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if seqlen > config.max_position_embeddings:
        raise ValueError(
            f"seqlen={seqlen} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    available = tokens.shape[0] // seqlen
    if available == 0:
        raise ValueError(
            f"text has {tokens.shape[0]} tokens, shorter than one window of seqlen={seqlen}"
        )
    if num_windows is None:
        num_windows = available
    if not 1 <= num_windows <= available:
        raise ValueError(
            f"num_windows={num_windows} not in [1, {available}] (available windows of "
            f"seqlen={seqlen} in {tokens.shape[0]} tokens)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(tokens.max()) >= config.vocab_size or int(tokens.min()) < 0:
        raise ValueError(
            f"token ids must be in [0, {config.vocab_size}), got range "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    fwd = forward_fn if forward_fn is not None else _ForwardLogits(config, jnp.dtype(dtype))
    windows = tokens[: num_windows * seqlen].reshape(num_windows, seqlen).astype(np.int32)
    total = 0.0
    bar = tqdm(total=num_windows, desc=f"ppl seqlen={seqlen}", disable=not progress, unit="win")
    for s in range(0, num_windows, batch_size):
        batch = jnp.asarray(windows[s : s + batch_size])
        nll = np.asarray(_batch_nll(params, batch, fwd), dtype=np.float64)
        total += float(nll.sum())
        bar.update(batch.shape[0])
        if progress:
            done = s + batch.shape[0]
            bar.set_postfix(ppl=f"{math.exp(total / (done * (seqlen - 1))):.4f}")
    bar.close()
    num_tokens = num_windows * (seqlen - 1)
    nll_mean = total / num_tokens
    return PerplexityResult(
        ppl=math.exp(nll_mean), nll_mean=nll_mean, num_tokens=num_tokens, num_windows=num_windows
    )
