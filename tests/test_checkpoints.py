"""Tests for checkpoint loaders (higgs_jax/checkpoints/hf.py, gguf.py) and tokenizer loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from higgs_jax.checkpoints import load_checkpoint, load_gguf, load_hf
from higgs_jax.checkpoints.gguf import unpermute_qk
from higgs_jax.checkpoints.hf import hf_name_map
from higgs_jax.models.llama import LlamaConfig, forward, param_shapes, random_params
from higgs_jax.tokenizer import load_tokenizer

CFG = LlamaConfig(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    max_position_embeddings=32,
    rope_theta=500.0,
)

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 50,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "max_position_embeddings": 32,
    "rope_theta": 500.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def _hf_tensors(params, config) -> dict[str, np.ndarray]:
    """params -> HF-named torch-layout numpy tensors."""
    out = {}
    for name, (keys, transpose) in hf_name_map(config).items():
        node = params
        for k in keys:
            node = node[k]
        a = np.asarray(node)
        out[name] = np.ascontiguousarray(a.T if transpose else a)
    return out


def _write_hf(tmp: Path, tensors: dict[str, np.ndarray], config: dict, shards: int = 1) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(tmp / "model.safetensors"))
        return tmp
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(tmp / fname))
        weight_map.update({n: fname for n in part})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, jax.random.key(0))


# ----------------------------------------------------------------------------- HF


def test_load_stories260k_shapes_and_config(shared_data):
    params, config = load_hf(shared_data / "stories260k")
    shapes = param_shapes(config)
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)):
        assert p.shape == s.shape and p.dtype == jnp.float32
    assert sum(p.size for p in jax.tree.leaves(params)) == 260_032
    assert "lm_head" not in params


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_roundtrip_single_and_sharded(tmp_path, params, shards):
    d = _write_hf(tmp_path, _hf_tensors(params, CFG), HF_CONFIG, shards=shards)
    loaded, config = load_hf(d)
    assert config == CFG
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_hf_dtype_and_load_checkpoint_dispatch(tmp_path, params):
    d = _write_hf(tmp_path, _hf_tensors(params, CFG), HF_CONFIG)
    loaded, _ = load_checkpoint(d, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded))


def test_hf_tied_checkpoint_may_store_lm_head_and_inv_freq(tmp_path):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    p = random_params(cfg, jax.random.key(1))
    t = _hf_tensors(p, cfg)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    d = _write_hf(tmp_path, t, dict(HF_CONFIG, tie_word_embeddings=True))
    loaded, config = load_hf(d)
    assert config.tie_word_embeddings and "lm_head" not in loaded


def _corrupt(kind: str, t: dict[str, np.ndarray]) -> str:
    if kind == "missing":
        name = "model.layers.1.mlp.up_proj.weight"
        del t[name]
    elif kind == "extra":
        name = "model.layers.2.mlp.up_proj.weight"
        t[name] = np.zeros((24, 16), np.float32)
    elif kind == "misshaped":
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = np.zeros((16, 16), np.float32)
    else:  # an attention bias that a bias-free config does not expect
        name = "model.layers.0.self_attn.q_proj.bias"
        t[name] = np.zeros((16,), np.float32)
    return name


@pytest.mark.parametrize("kind", ["missing", "extra", "misshaped", "unexpected_bias"])
def test_hf_bad_tensors_raise_naming_them(tmp_path, params, kind):
    t = _hf_tensors(params, CFG)
    name = _corrupt(kind, t)
    d = _write_hf(tmp_path, t, HF_CONFIG)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_hf(d)


def test_hf_unsupported_architecture(tmp_path, params):
    d = _write_hf(
        tmp_path,
        _hf_tensors(params, CFG),
        dict(HF_CONFIG, architectures=["FalconForCausalLM"], model_type="falcon"),
    )
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_hf(d)


@pytest.mark.parametrize("what", ["no_config", "not_a_checkpoint"])
def test_load_checkpoint_rejects_non_checkpoints(tmp_path, what):
    target = tmp_path if what == "no_config" else tmp_path / "weights.bin"
    if what == "not_a_checkpoint":
        target.write_bytes(b"\0")
    with pytest.raises(ValueError, match="config.json" if what == "no_config" else "gguf"):
        load_checkpoint(target)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_stories_vocab(shared_data):
    cfg = LlamaConfig.from_hf_dict(
        json.loads((shared_data / "stories260k/config.json").read_text())
    )
    tok = load_tokenizer(shared_data / "stories260k", cfg)
    ids = tok.encode("Once upon a time", add_special_tokens=False).ids
    assert max(ids) < cfg.vocab_size
    assert tok.decode(ids) == "Once upon a time"


def test_tokenizer_vocab_mismatch_raises(shared_data):
    with pytest.raises(ValueError, match="vocab"):
        load_tokenizer(shared_data / "smollm2-135m-instruct", CFG)


def test_tokenizer_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- GGUF


def _permute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: within each head, HF row s*hd/2 + j goes to row 2j + s."""
    d_out = w.shape[0]
    return (
        w.reshape(num_heads, 2, d_out // num_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_qk_inverts_llama_cpp_permutation():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    np.testing.assert_array_equal(unpermute_qk(_permute_qk(w, 4), 4), w)
    # head 0, hd = 8: file rows (0, 1) hold HF rows (0, 4): the first RoPE pair.
    np.testing.assert_array_equal(_permute_qk(w, 4)[:2], w[[0, 4]])


def _write_gguf(
    path: Path, params, config: LlamaConfig, *, drop: str | None = None, q8_kernels: bool = False
) -> Path:
    import gguf

    from higgs_jax.checkpoints.gguf import _gguf_name

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.head_dim)
    for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in p)
        name = _gguf_name(keys)
        if name == drop:
            continue
        a = np.asarray(leaf, np.float32)
        if keys[-1] == "kernel":
            a = np.ascontiguousarray(a.T)
        if keys[-2] in ("q_proj", "k_proj"):
            a = _permute_qk(a, config.num_heads if keys[-2] == "q_proj" else config.num_kv_heads)
        if q8_kernels and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_CFG = dataclasses.replace(
    CFG, hidden_size=32, intermediate_size=64, head_dim=8, tie_word_embeddings=True
)


@pytest.mark.parametrize("q8", [False, True], ids=["f32", "q8_0"])
def test_gguf_roundtrip_unpermutes_qk(tmp_path, q8):
    params = random_params(GGUF_CFG, jax.random.key(2))
    path = _write_gguf(tmp_path / "m.gguf", params, GGUF_CFG, q8_kernels=q8)
    loaded, config = load_checkpoint(path)
    assert config == GGUF_CFG
    tol = 1e-2 if q8 else 0.0  # Q8_0: 8-bit blocks of 32, error <= scale/2
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.abs(a).max()) + 1e-7)
    toks = jnp.arange(10, dtype=jnp.int32)[None] % GGUF_CFG.vocab_size
    ref, got = forward(params, toks, GGUF_CFG)[0], forward(loaded, toks, config)[0]
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < (3e-2 if q8 else 1e-6), rel


def test_gguf_missing_tensor_raises(tmp_path):
    params = random_params(GGUF_CFG, jax.random.key(3))
    path = _write_gguf(tmp_path / "m.gguf", params, GGUF_CFG, drop="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight"):
        load_gguf(path)


@pytest.mark.slow
def test_gguf_smollm2_loads_with_sane_perplexity(shared_data):
    from higgs_jax.evaluate import perplexity, tokenize_text

    d = shared_data / "smollm2-135m-instruct"
    gguf_path = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_path.is_file():
        pytest.skip("smollm2 GGUF not present")
    params, config = load_gguf(gguf_path)
    assert config == LlamaConfig.from_hf_dict(json.loads((d / "config.json").read_text()))
    assert sum(p.size for p in jax.tree.leaves(params)) == 134_515_008
    tok = load_tokenizer(d, config)
    text = (shared_data / "text" / "wikitext2_test.txt").read_text()[:20000]
    ids = tokenize_text(tok, text)
    # Correct q/k order gives PPL ~20 on WikiText-2; the permuted layout gives hundreds.
    res = perplexity(params, config, ids, seqlen=512, num_windows=2, progress=False)
    assert res.ppl < 40, res.ppl
