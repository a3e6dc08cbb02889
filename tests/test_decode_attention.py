"""The decode-attention kernel (`pallas_kernels.decode_attention`): interpret mode on the CPU
against the plain-jnp reference, its errors, its Triton lowering, and the model's decode step
through it; the same on a GPU behind the ``gpu`` marker."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from higgs_jax.models.llama import LlamaConfig, forward, init_cache, random_params
from pallas_kernels.decode_attention import (
    can_use_pallas,
    decode_attention,
    decode_attention_pallas,
    decode_attention_reference,
)

ON_GPU = any(d.platform == "gpu" for d in jax.devices())


def operands(b, s, hkv, g, hd, *, dtype=jnp.bfloat16, cache_dtype=None, seed=0, keep=0.8):
    ks = jax.random.split(jax.random.key(seed), 6)
    cache_dtype = cache_dtype or dtype
    q = jax.random.normal(ks[0], (b, hkv * g, hd), dtype)
    kn = jax.random.normal(ks[1], (b, hkv, hd), dtype)
    vn = jax.random.normal(ks[2], (b, hkv, hd), dtype)
    kc = jax.random.normal(ks[3], (b, s, hkv, hd), cache_dtype)
    vc = jax.random.normal(ks[4], (b, s, hkv, hd), cache_dtype)
    mask = jax.random.uniform(ks[5], (b, s)) < keep
    return q, kn, vn, kc, vc, mask


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want))
    assert err <= tol * max(1.0, np.max(np.abs(want))), err


@pytest.mark.parametrize(
    "b,s,hkv,g,hd,index",
    [
        (1, 64, 2, 4, 32, 0),  # only the new slot
        (2, 128, 2, 3, 32, 70),  # G = 3 (SmolLM2), several blocks, the slot inside block 1
        (1, 96, 1, 1, 16, 63),  # S = 96: 32-slot blocks; the last slot of a block
        (2, 64, 4, 2, 64, 64),  # index = S: XLA's update clamps to slot S - 1
        (1, 48, 2, 8, 16, 200),  # far past the end: clamped, every slot visible
    ],
)
def test_kernel_matches_reference(b, s, hkv, g, hd, index):
    q, kn, vn, kc, vc, mask = operands(b, s, hkv, g, hd, seed=index)
    mask = mask.at[:, min(index, s - 1)].set(True)  # the row sees its own token
    want = decode_attention_reference(q, kn, vn, kc, vc, index, mask)
    got = decode_attention_pallas(q, kn, vn, kc, vc, index, mask, interpret=True)
    assert got[0].shape == (b, hkv * g, hd) and got[0].dtype == q.dtype
    _close(got[0], want[0], 2e-2)  # bf16 probabilities, normalised before vs after the cast
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))  # caches: exact
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    # the cache update is the only change to the caches
    slot = min(index, s - 1)
    np.testing.assert_array_equal(np.asarray(got[1][:, slot]), np.asarray(kn))
    untouched = np.ones(s, bool)
    untouched[slot] = False
    np.testing.assert_array_equal(np.asarray(got[1][:, untouched]), np.asarray(kc[:, untouched]))


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_split_cache_walk_matches_reference(splits):
    """The cache walk split over programs (flash-decoding partials merged by `_combine`) gives
    the one-program result; 3 splits of 8 blocks leave uneven ranges, and at index 70 the splits
    past block 1 see no slot at all."""
    from pallas_kernels.decode_attention.kernel import splits_for

    q, kn, vn, kc, vc, mask = operands(1, 512, 2, 4, 32, dtype=jnp.float32, seed=splits)
    mask = mask.at[:, 70].set(True)
    want = decode_attention_reference(q, kn, vn, kc, vc, 70, mask)
    got = decode_attention_pallas(q, kn, vn, kc, vc, 70, mask, interpret=True, splits=splits)
    _close(got[0], want[0], 1e-5)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    assert splits_for(1, 8, 8) == 8 and splits_for(16, 8, 8) == 1 and splits_for(1, 8, 64) == 16


def test_bad_splits_are_named():
    q, kn, vn, kc, vc, mask = operands(1, 256, 2, 2, 16)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=f"splits must be an int in 1..4 .* got {bad!r}"):
            decode_attention_pallas(q, kn, vn, kc, vc, 0, mask, interpret=True, splits=bad)


def test_float32_with_float32_cache_is_tight():
    q, kn, vn, kc, vc, mask = operands(2, 64, 2, 2, 32, dtype=jnp.float32, seed=5)
    mask = mask.at[:, 17].set(True)
    want = decode_attention_reference(q, kn, vn, kc, vc, 17, mask)
    got = decode_attention_pallas(q, kn, vn, kc, vc, 17, mask, interpret=True)
    _close(got[0], want[0], 1e-5)


def test_bf16_queries_with_float32_cache():
    """The model's default cache dtype is float32 while the compute dtype may be bf16: keys and
    values are cast to q's dtype, the cache keeps float32 (the new entries cast exactly)."""
    q, kn, vn, kc, vc, mask = operands(1, 64, 2, 4, 32, cache_dtype=jnp.float32, seed=9)
    mask = mask.at[:, 30].set(True)
    want = decode_attention_reference(q, kn, vn, kc, vc, 30, mask)
    got = decode_attention_pallas(q, kn, vn, kc, vc, 30, mask, interpret=True)
    assert got[1].dtype == jnp.float32
    _close(got[0], want[0], 2e-2)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_masked_slots_do_not_contribute():
    """Changing a masked slot's key/value (or any slot past index) leaves the output unchanged."""
    q, kn, vn, kc, vc, mask = operands(1, 64, 1, 2, 16, dtype=jnp.float32, seed=3)
    mask = mask.at[0, 10].set(False).at[0, 20].set(True)
    base = decode_attention_pallas(q, kn, vn, kc, vc, 20, mask, interpret=True)[0]
    kc2 = kc.at[0, 10].add(100.0).at[0, 40].add(100.0)
    vc2 = vc.at[0, 10].add(100.0).at[0, 40].add(100.0)
    moved = decode_attention_pallas(q, kn, vn, kc2, vc2, 20, mask, interpret=True)[0]
    np.testing.assert_array_equal(np.asarray(base), np.asarray(moved))


def test_row_without_visible_slots_is_zero():
    q, kn, vn, kc, vc, _ = operands(2, 32, 1, 2, 16, dtype=jnp.float32)
    mask = jnp.zeros((2, 32), bool).at[1].set(True)
    out = decode_attention_pallas(q, kn, vn, kc, vc, 5, mask, interpret=True)[0]
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(np.asarray(out[1])))
    assert np.any(np.asarray(out[1]) != 0)


def test_auto_off_gpu_is_the_reference():
    args = operands(1, 32, 2, 2, 16, seed=1)
    ops = args[:5] + (7, args[5])
    if ON_GPU:
        pytest.skip("on a GPU 'auto' takes the kernel")
    ok, why = can_use_pallas(args[0], args[3])
    assert not ok and "not an NVIDIA GPU" in why
    got = decode_attention(*ops)
    want = decode_attention_reference(*ops)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="implementation='pallas' is not available here"):
        decode_attention(*ops, implementation="pallas")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(hd=8), "head_dim=8 is not a power of two >= 16"),
        (dict(hd=48), "head_dim=48 is not a power of two >= 16"),
        (dict(s=40), "cache length S=40 is not a multiple of 16"),
    ],
)
def test_unsupported_shapes_are_named(change, match):
    kw = dict(b=1, s=32, hkv=2, g=2, hd=16) | change
    q, kn, vn, kc, vc, mask = operands(**kw)
    with pytest.raises(ValueError, match=match):
        decode_attention_pallas(q, kn, vn, kc, vc, 0, mask, interpret=True)
    assert match in can_use_pallas(q, kc)[1]


def test_mismatched_operands_are_named():
    q, kn, vn, kc, vc, mask = operands(1, 32, 2, 2, 16)
    with pytest.raises(ValueError, match=r"k_new has shape \(1, 3, 16\), want \(1, 2, 16\)"):
        decode_attention_pallas(q, kn[:, :1].repeat(3, 1), vn, kc, vc, 0, mask, interpret=True)
    with pytest.raises(ValueError, match=r"mask has shape \(1, 16\), want \(1, 32\)"):
        decode_attention_pallas(q, kn, vn, kc, vc, 0, mask[:, :16], interpret=True)
    with pytest.raises(ValueError, match="index must be a scalar"):
        decode_attention_pallas(q, kn, vn, kc, vc, jnp.zeros(2, jnp.int32), mask, interpret=True)
    with pytest.raises(ValueError, match="does not match caches"):
        decode_attention_pallas(q[:, :3], kn, vn, kc, vc, 0, mask, interpret=True)
    with pytest.raises(ValueError, match="v cache"):
        decode_attention_pallas(q, kn, vn, kc, vc[:, :16], 0, mask, interpret=True)
    with pytest.raises(ValueError, match="implementation must be one of"):
        decode_attention(q, kn, vn, kc, vc, 0, mask, implementation="cuda")
    with pytest.raises(ValueError, match="contradicts 'xla'"):
        decode_attention(q, kn, vn, kc, vc, 0, mask, implementation="xla", interpret=True)


def test_lowers_to_triton_without_a_gpu():
    """Lowering for the "cuda" platform builds the kernel's Triton IR on a CPU-only jaxlib (the
    dynamic trip count, the aliased cache stores, the masked q rows)."""
    q, kn, vn, kc, vc, mask = operands(1, 512, 8, 4, 128)
    f = jax.jit(decode_attention_pallas)
    text = f.trace(q, kn, vn, kc, vc, jnp.int32(3), mask).lower(
        lowering_platforms=("cuda",)
    ).as_text()
    assert "decode_attention_g4_hd128" in text


CFG = LlamaConfig(
    vocab_size=101,
    hidden_size=96,
    intermediate_size=128,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=1000.0,
    max_position_embeddings=64,
)


FWD = jax.jit(forward, static_argnums=2, static_argnames=("dtype", "attention"))


def _decode_steps(params, impl, dtype, steps=3):
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, CFG.vocab_size, jnp.int32)
    cache = init_cache(CFG, 2, 32, dtype=jnp.float32)
    logits, cache = FWD(params, prompt, CFG, cache=cache, dtype=dtype, attention=impl)
    outs = [logits]
    tok = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    for _ in range(steps):
        logits, cache = FWD(params, tok, CFG, cache=cache, dtype=dtype, attention=impl)
        outs.append(logits)
        tok = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    return outs, cache


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_model_decode_through_the_kernel(dtype, monkeypatch):
    """Prefill (T = 5: XLA attention) then three one-token steps: with the kernel in interpret
    mode the logits and the KV cache follow the XLA path's."""
    import pallas_kernels.decode_attention as da

    calls = []
    real = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    params = random_params(CFG, jax.random.key(0))
    want, cache_x = _decode_steps(params, "xla", dtype)
    assert calls == []
    got, cache_k = _decode_steps(params, "interpret", dtype)
    assert calls == [{"interpret": True}] * CFG.num_layers  # traced once, one call per layer
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol
    assert int(cache_k["index"]) == int(cache_x["index"]) == 8
    np.testing.assert_allclose(
        np.asarray(cache_k["layers_1"]["k"]), np.asarray(cache_x["layers_1"]["k"]), rtol=tol,
        atol=tol,
    )


def test_generate_through_the_kernel_matches_xla():
    """`generate` (cache of 5 + 9 tokens rounded up to 64 slots) gives the same greedy tokens with
    the kernel in interpret mode as with XLA's attention; a bad name is refused."""
    from higgs_jax.models.llama import generate

    params = random_params(CFG, jax.random.key(2))
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, CFG.vocab_size, jnp.int32)
    want = generate(params, CFG, prompt, 9, attention="xla")
    got = generate(params, CFG, prompt, 9, attention="interpret")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="attention must be one of .* got 'fast'"):
        generate(params, CFG, prompt, 2, attention="fast")


def test_bad_attention_implementation_is_named():
    params = random_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="attention must be one of .* got 'triton'"):
        forward(params, jnp.zeros((1, 1), jnp.int32), CFG, attention="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    "b,s,hkv,g,hd,index", [(1, 512, 8, 4, 128, 128), (16, 512, 8, 4, 128, 511), (2, 256, 3, 3, 64, 300)]
)
def test_gpu_kernel_matches_reference(b, s, hkv, g, hd, index):
    q, kn, vn, kc, vc, mask = operands(b, s, hkv, g, hd, seed=b + index)
    mask = mask.at[:, min(index, s - 1)].set(True)
    want = jax.jit(decode_attention_reference)(q, kn, vn, kc, vc, index, mask)
    got = jax.jit(decode_attention_pallas)(q, kn, vn, kc, vc, index, mask)
    _close(got[0], want[0], 2e-2)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
def test_gpu_model_decode_auto_takes_the_kernel():
    cfg = dataclasses.replace(CFG, head_dim=64, num_heads=8, num_kv_heads=2, hidden_size=256)
    params = random_params(cfg, jax.random.key(1))
    cache = init_cache(cfg, 1, 64, dtype=jnp.bfloat16)
    tok = jnp.zeros((1, 1), jnp.int32)
    text = FWD.lower(params, tok, cfg, cache=cache, dtype=jnp.bfloat16).as_text()
    assert "decode_attention_g4_hd64" in text
    ref = FWD(params, tok, cfg, cache=cache, dtype=jnp.bfloat16, attention="xla")
    got = FWD(params, tok, cfg, cache=cache, dtype=jnp.bfloat16)
    a, b = np.asarray(got[0], np.float64), np.asarray(ref[0], np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 5e-2
