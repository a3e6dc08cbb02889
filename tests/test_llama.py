"""Tests for the Llama-family model (higgs_jax/models/llama.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax.models.llama import (
    LlamaConfig,
    forward,
    generate,
    init_cache,
    param_shapes,
    random_params,
    rope_inv_freq,
)

FIXTURES = Path(__file__).parent / "fixtures"

SMALL = LlamaConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=40,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=1000.0,
    max_position_embeddings=64,
)
ALLBIAS = dataclasses.replace(
    SMALL,
    num_kv_heads=4,
    attention_bias=True,
    attention_out_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
)
# Two configs cover: GQA (G=2) vs MHA, untied vs tied lm_head, no biases vs every bias.
CONFIGS = {"gqa_untied": SMALL, "mha_tied_biases": ALLBIAS}
T = 10  # one sequence length for most tests, so the jitted forward compiles once per config

# One jitted forward shared by the tests: compiled once per (config, shapes), not op by op.
fwd = jax.jit(forward, static_argnums=2, static_argnames=("dtype",))


def _tokens(config: LlamaConfig, shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def stories(shared_data):
    from higgs_jax.checkpoints.hf import load_hf

    return load_hf(shared_data / "stories260k")


# ----------------------------------------------------------------------------- parity


def test_logits_match_pytorch_reference(stories):
    """fp32 logits equal PyTorch transformers' LlamaForCausalLM (recorded fixture)."""
    params, config = stories
    ref = np.load(FIXTURES / "stories260k_logits.npz")
    logits, _ = fwd(params, jnp.asarray(ref["tokens"]), config)
    logits = np.asarray(logits)
    expected = ref["logits"]
    assert logits.shape == expected.shape
    rel = np.linalg.norm(logits - expected) / np.linalg.norm(expected)
    assert rel < 1e-5, rel
    np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-4)


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_shapes_match_random_params(name):
    config = CONFIGS[name]
    shapes = param_shapes(config, jnp.bfloat16)
    params = random_params(config, jax.random.key(0), jnp.bfloat16)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for s, p in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)):
        assert s.shape == p.shape and s.dtype == p.dtype
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    has_qbias = "bias" in params["layers_0"]["attn"]["q_proj"]
    assert has_qbias == config.attention_bias
    assert ("bias" in params["layers_0"]["attn"]["o_proj"]) == config.attention_out_bias
    assert ("bias" in params["layers_1"]["mlp"]["down_proj"]) == config.mlp_bias


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_equals_unbatched(name):
    config = CONFIGS[name]
    params = random_params(config, jax.random.key(1))
    toks = _tokens(config, (2, T))
    batched, _ = fwd(params, toks, config)
    for b in range(2):
        single, _ = fwd(params, toks[b : b + 1], config)
        np.testing.assert_allclose(batched[b], single[0], rtol=1e-5, atol=1e-5)


def test_jit_equals_eager():
    config = CONFIGS["mha_tied_biases"]  # eager dispatch is op by op: one config keeps this fast
    params = random_params(config, jax.random.key(2))
    toks = _tokens(config, (2, T))
    eager, _ = forward(params, toks, config)
    jitted, _ = jax.jit(forward, static_argnums=2)(params, toks, config)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    params = random_params(SMALL, jax.random.key(3))
    toks = _tokens(SMALL, (2, T))
    changed = toks.at[0, 8:].set((toks[0, 8:] + 1) % SMALL.vocab_size)
    a, _ = fwd(params, toks, SMALL)
    b, _ = fwd(params, changed, SMALL)
    np.testing.assert_allclose(a[0, :8], b[0, :8], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[0, 8:], b[0, 8:])


def test_rope_attention_scores_depend_only_on_relative_position():
    """<rope(q, m), rope(k, n)> is a function of m - n."""
    from higgs_jax.models.llama import _rope

    q = jax.random.normal(jax.random.key(0), (1, 1, 1, SMALL.head_dim))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, SMALL.head_dim))
    inv = rope_inv_freq(SMALL)

    def score(m, n):
        qm = _rope(q, jnp.full((1, 1), m), inv)
        kn = _rope(k, jnp.full((1, 1), n), inv)
        return float(jnp.sum(qm * kn))

    assert score(7, 3) == pytest.approx(score(24, 20), rel=1e-5)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-6)
    assert score(7, 3) != pytest.approx(score(3, 7), rel=1e-3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_incremental_equals_full_forward(name):
    config = CONFIGS[name]
    params = random_params(config, jax.random.key(4))
    toks = _tokens(config, (2, T))
    full, _ = fwd(params, toks, config)
    cache = init_cache(config, 2, 16)
    step = jax.jit(lambda p, t, c: forward(p, t, config, cache=c))
    prefill, cache = step(params, toks[:, :4], cache)
    pieces = [prefill]
    for t in range(4, 10):
        out, cache = step(params, toks[:, t : t + 1], cache)
        pieces.append(out)
    assert int(cache["index"]) == 10
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_with_attention_mask_and_positions_matches_unpadded():
    params = random_params(SMALL, jax.random.key(5))
    toks = _tokens(SMALL, (1, 7))
    ref, _ = fwd(params, toks, SMALL)
    pad = 3
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), toks], axis=1)
    mask = jnp.arange(pad + 7)[None] >= pad
    positions = jnp.maximum(jnp.arange(pad + 7) - pad, 0)[None]
    out, _ = fwd(params, padded, SMALL, positions=positions, attention_mask=mask)
    np.testing.assert_allclose(out[:, pad:], ref, rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_f32():
    params = random_params(SMALL, jax.random.key(6))
    toks = _tokens(SMALL, (2, T))
    f32, _ = fwd(params, toks, SMALL)
    bf16, _ = fwd(
        jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), toks, SMALL, dtype=jnp.bfloat16
    )
    assert bf16.dtype == jnp.float32
    rel = jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)
    assert float(rel) < 5e-2


# ----------------------------------------------------------------------------- biases, lm_head

_BIAS_PATHS = [
    ("attn", "q_proj"),
    ("attn", "k_proj"),
    ("attn", "v_proj"),
    ("attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
]


@pytest.mark.parametrize("path", _BIAS_PATHS, ids=lambda p: p[1])
def test_every_bias_is_applied(path):
    params = random_params(ALLBIAS, jax.random.key(7))
    toks = _tokens(ALLBIAS, (2, T))
    base, _ = fwd(params, toks, ALLBIAS)
    group, proj = path
    bias = params["layers_1"][group][proj]["bias"]
    params["layers_1"][group][proj]["bias"] = bias + 0.5
    changed, _ = fwd(params, toks, ALLBIAS)
    # k_proj bias shifts every key by the same rotated vector: the change is real but small.
    assert float(jnp.max(jnp.abs(changed - base))) > 1e-4


def test_untied_lm_head_equal_to_embedding_transpose_matches_tied():
    tied_cfg = dataclasses.replace(SMALL, tie_word_embeddings=True)
    params = random_params(tied_cfg, jax.random.key(8))
    untied = dict(params, lm_head={"kernel": params["embed_tokens"]["embedding"].T})
    toks = _tokens(SMALL, (2, T))
    a, _ = fwd(params, toks, tied_cfg)
    b, _ = fwd(untied, toks, SMALL)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    c, _ = fwd(dict(untied, lm_head={"kernel": untied["lm_head"]["kernel"] * 2}), toks, SMALL)
    np.testing.assert_allclose(c, 2 * b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_generate_is_deterministic_and_matches_forward_argmax(name):
    config = CONFIGS[name]
    params = random_params(config, jax.random.key(9))
    prompt = _tokens(config, (2, 5))
    out1 = generate(params, config, prompt, 8)
    out2 = generate(params, config, prompt, 8)
    assert out1.shape == (2, 13)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(out1[:, :5], prompt)
    logits, _ = fwd(params, out1[:, :-1], config)
    np.testing.assert_array_equal(jnp.argmax(logits[:, 4:], axis=-1), out1[:, 5:])


def test_generate_unbatched_prompt_and_sampling():
    params = random_params(SMALL, jax.random.key(10))
    prompt = _tokens(SMALL, (4,))
    greedy = generate(params, SMALL, prompt, 6)
    assert greedy.shape == (10,)
    top1 = generate(params, SMALL, prompt, 6, key=jax.random.key(1), temperature=1.0, top_k=1)
    np.testing.assert_array_equal(greedy, top1)
    s1 = generate(params, SMALL, prompt, 6, key=jax.random.key(2), temperature=2.0)
    s2 = generate(params, SMALL, prompt, 6, key=jax.random.key(2), temperature=2.0)
    np.testing.assert_array_equal(s1, s2)


def test_stories260k_greedy_generation_is_fluent(stories, shared_data):
    from higgs_jax.tokenizer import load_tokenizer

    params, config = stories
    tok = load_tokenizer(shared_data / "stories260k", config)
    prompt = jnp.asarray([1] + tok.encode("Once upon a time", add_special_tokens=False).ids)
    out = generate(params, config, prompt, 24)
    text = tok.decode(np.asarray(out).tolist())
    assert text.startswith("Once upon a time")
    assert len(text) > len("Once upon a time") + 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 100}, "max_position_embeddings"),
        ({"max_new_tokens": 2, "temperature": 1.0}, "PRNG key"),
        ({"max_new_tokens": 2, "top_k": 0}, "top_k"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    params = random_params(SMALL, jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        generate(params, SMALL, _tokens(SMALL, (1, 3)), **kwargs)


# ----------------------------------------------------------------------------- config parsing


def _hf(**overrides):
    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_from_hf_dict_reads_stories_config(shared_data):
    import json

    cfg = LlamaConfig.from_hf_dict(
        json.loads((shared_data / "stories260k/config.json").read_text())
    )
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        64,
        5,
        8,
        4,
        8,
    )
    assert cfg.tie_word_embeddings and cfg.rope_theta == 10000.0


def test_from_hf_dict_qwen2_biases_and_default_head_dim():
    cfg = LlamaConfig.from_hf_dict(
        _hf(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            sliding_window=4096,
            use_sliding_window=False,
        )
    )
    assert cfg.attention_bias and not cfg.attention_out_bias and cfg.head_dim == 8


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"architectures": None, "model_type": "gemma"}, "gemma"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        (
            {
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": 32,
            },
            "sliding",
        ),
    ],
)
def test_from_hf_dict_rejects_unsupported(overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf_dict(_hf(**overrides))


def test_llama3_rope_scaling_keeps_high_and_slows_low_frequencies():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = LlamaConfig.from_hf_dict(_hf(rope_scaling=scaling, hidden_size=128))
    base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    wavelen = 2 * np.pi / base
    high = wavelen < 64 / 4.0
    low = wavelen > 64 / 1.0
    assert high.any() and low.any()
    np.testing.assert_allclose(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8.0)
    mid = ~high & ~low
    assert np.all((scaled[mid] <= base[mid]) & (scaled[mid] >= base[mid] / 8.0))


@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("num_kv_heads", 3), ("head_dim", 7)])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field if field != "num_kv_heads" else "num_kv_heads"):
        dataclasses.replace(SMALL, **{field: value})


def test_config_roundtrips_through_asdict_and_stays_hashable():
    import json

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = LlamaConfig.from_hf_dict(_hf(rope_scaling=scaling, eos_token_id=[2, 3]))
    again = LlamaConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and hash(again) == hash(cfg)
    assert again.eos_token_id == (2, 3)


def test_forward_with_quantized_kernels_equals_dequantized_forward():
    """Kernels as HiggsTensor leaves go through the matmul dispatch (biases still applied)."""
    try:
        from higgs_jax import HiggsConfig, HiggsTensor, dequantize_params, quantize_params
    except ImportError as e:  # the quantization stack lands separately
        pytest.skip(f"quantization modules not importable: {e}")
    params = random_params(ALLBIAS, jax.random.key(11))
    qparams, _ = quantize_params(params, HiggsConfig(bits=4, p=2, hadamard_size=8))
    leaves = jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, HiggsTensor))
    assert any(isinstance(x, HiggsTensor) for x in leaves)
    toks = _tokens(ALLBIAS, (2, T))
    q_logits, _ = fwd(qparams, toks, ALLBIAS)
    d_logits, _ = fwd(dequantize_params(qparams), toks, ALLBIAS)
    np.testing.assert_allclose(q_logits, d_logits, rtol=1e-4, atol=1e-4)
    fp_logits, _ = fwd(params, toks, ALLBIAS)
    rel = jnp.linalg.norm(q_logits - fp_logits) / jnp.linalg.norm(fp_logits)
    assert 0 < float(rel) < 0.3
