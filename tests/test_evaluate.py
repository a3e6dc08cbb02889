"""Tests for perplexity evaluation (higgs_jax/evaluate.py) against the data README's references."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax.evaluate import perplexity, tokenize_text
from higgs_jax.models.llama import LlamaConfig, forward, random_params

TINY = LlamaConfig(
    vocab_size=37,
    hidden_size=16,
    intermediate_size=24,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=32,
)


@pytest.fixture(scope="module")
def stories(shared_data):
    from higgs_jax.checkpoints.hf import load_hf
    from higgs_jax.tokenizer import load_tokenizer

    params, config = load_hf(shared_data / "stories260k")
    tok = load_tokenizer(shared_data / "stories260k", config)
    return params, config, tok


@pytest.fixture(scope="module")
def tinystories_ids(stories, shared_data):
    _, _, tok = stories
    text = (shared_data / "text" / "tinystories_valid.txt").read_text()
    # 40 windows of 512 need 20,480 tokens; ~100k characters give plenty.
    return tokenize_text(tok, text[:120_000], bos_id=1)


def test_stories260k_reference_perplexity(stories, tinystories_ids):
    """Data README: stories260k, TinyStories, seqlen 512, first 40 windows -> 4.0677."""
    params, config, _ = stories
    res = perplexity(
        params, config, tinystories_ids, seqlen=512, num_windows=40, batch_size=8, progress=False
    )
    assert res.num_windows == 40 and res.num_tokens == 40 * 511
    assert res.ppl == pytest.approx(4.0677, rel=1e-3)
    assert res.nll_mean == pytest.approx(math.log(res.ppl))


def test_tokenize_text_prepends_bos_once(stories):
    _, _, tok = stories
    plain = tokenize_text(tok, "Once upon a time. Once upon a time.")
    with_bos = tokenize_text(tok, "Once upon a time. Once upon a time.", bos_id=1)
    assert plain.dtype == np.int32 and plain[0] != 1
    np.testing.assert_array_equal(with_bos, np.concatenate([[1], plain]))
    assert int((with_bos == 1).sum()) == 1


def _uniform_logits(params, tokens, *, vocab):
    return jnp.zeros(tokens.shape + (vocab,), jnp.float32)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    toks = np.arange(100, dtype=np.int32) % TINY.vocab_size
    fn = functools.partial(_uniform_logits, vocab=TINY.vocab_size)
    res = perplexity({}, TINY, toks, seqlen=16, forward_fn=fn, progress=False)
    assert res.num_windows == 6  # 100 // 16, remainder dropped
    assert res.ppl == pytest.approx(TINY.vocab_size, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_perplexity_matches_direct_computation_for_any_batch_size(batch_size):
    params = random_params(TINY, jax.random.key(0))
    toks = np.asarray(jax.random.randint(jax.random.key(1), (90,), 0, TINY.vocab_size), np.int32)
    res = perplexity(
        params, TINY, toks, seqlen=16, num_windows=5, batch_size=batch_size, progress=False
    )
    windows = toks[:80].reshape(5, 16)
    logits = np.asarray(forward(params, jnp.asarray(windows), TINY)[0], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], axis=-1).mean()
    assert res.nll_mean == pytest.approx(nll, rel=1e-5)
    assert res.num_tokens == 5 * 15


@pytest.mark.parametrize(
    "kwargs, n_tokens, match",
    [
        ({"seqlen": 16}, 10, "shorter than one window"),
        ({"seqlen": 64}, 200, "max_position_embeddings"),
        ({"seqlen": 16, "num_windows": 7}, 100, "num_windows=7"),
        ({"seqlen": 1}, 100, "seqlen"),
        ({"seqlen": 16, "batch_size": 0}, 100, "batch_size"),
    ],
)
def test_perplexity_rejects_bad_input(kwargs, n_tokens, match):
    toks = np.zeros(n_tokens, np.int32)
    with pytest.raises(ValueError, match=match):
        perplexity({}, TINY, toks, progress=False, **kwargs)


def test_perplexity_rejects_out_of_vocab_tokens():
    with pytest.raises(ValueError, match="token ids"):
        perplexity({}, TINY, np.full(40, TINY.vocab_size, np.int32), seqlen=16, progress=False)


@pytest.mark.slow
def test_smollm2_wikitext2_reference_perplexity(shared_data):
    """Data README: smollm2-135m (dequantized Q4_1), WikiText-2 test, 2048, first 10 -> 19.9222."""
    from higgs_jax.checkpoints.gguf import load_gguf
    from higgs_jax.tokenizer import load_tokenizer

    d = shared_data / "smollm2-135m-instruct"
    gguf_path = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    text_path = shared_data / "text" / "wikitext2_test.txt"
    if not gguf_path.is_file() or not text_path.is_file():
        pytest.skip("smollm2 GGUF or WikiText-2 text not present")
    params, config = load_gguf(gguf_path)
    tok = load_tokenizer(d, config)
    ids = tokenize_text(tok, text_path.read_text())
    assert ids.shape[0] == 304_986
    res = perplexity(params, config, ids, seqlen=2048, num_windows=10, progress=False)
    assert res.ppl == pytest.approx(19.9222, rel=1e-3)
