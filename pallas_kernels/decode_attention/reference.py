"""Plain-jnp reference of one decode step of grouped-query attention (what the kernel computes).

The same arithmetic as `higgs_jax.models.llama` for one new token: write the new key/value at
slot ``index`` (`lax.dynamic_update_slice`, which clamps the slot to S - 1), scores in float32
scaled by 1/sqrt(hd), masked softmax, probabilities in the value dtype, PV in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def decode_attention_reference(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    index: jax.Array | int,
    mask: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q (B, Hq, hd); k_new, v_new (B, Hkv, hd); caches (B, S, Hkv, hd); index scalar; mask bool
    (B, S). Returns (out (B, Hq, hd) in q's dtype, new k cache, new v cache)."""
    b, hq, hd = q.shape
    _, s_len, hkv, _ = k_cache.shape
    index = jnp.asarray(index, jnp.int32)
    kc = jax.lax.dynamic_update_slice(k_cache, k_new[:, None].astype(k_cache.dtype), (0, index, 0, 0))
    vc = jax.lax.dynamic_update_slice(v_cache, v_new[:, None].astype(v_cache.dtype), (0, index, 0, 0))
    qg = q.reshape(b, hkv, hq // hkv, hd)
    k = kc.astype(q.dtype)
    v = vc.astype(q.dtype)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(hd)
    ok = mask.astype(bool) & (jnp.arange(s_len)[None, :] <= index)
    scores = jnp.where(ok[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgs,bskd->bkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, hq, hd).astype(q.dtype), kc, vc
