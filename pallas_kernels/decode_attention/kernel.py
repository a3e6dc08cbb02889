"""One decode step of grouped-query attention as one Pallas (Triton) kernel.

Decoding one token per row, the XLA path of `higgs_jax.models.llama` launches, per layer, two
cache updates (dynamic-update-slice), a QK^T GEMM, the masked softmax (two reductions) and a PV
GEMM: about 12 µs of small kernels on an H100 for a Llama-3.1-8B layer at batch 1 (session 16
profile). This kernel does the same in one launch:

- program (b, g) owns batch row b and KV head g, i.e. query heads g G .. g G + G - 1
  (G = Hq / Hkv; the rows of `q.reshape(B, Hkv, G, hd)`, as `llama._attention` groups them);
- it writes the new key and value into cache slot ``min(index, S - 1)`` (the slot XLA's
  dynamic-update-slice would write: it clamps), through outputs aliased to the caches;
- it walks the cache in blocks of `BLOCK_S` slots up to the block holding ``index`` (slots
  past it are masked anyway), with an online softmax in float32: running max m, running sum l,
  accumulator acc (G, hd); the new slot's key/value come from registers, not from the cache
  (the kernel has just written it, and a load after the store would need a barrier);
- with few (row, KV head) pairs (batch 1: 8 for Llama-3.1-8B) the walk is split: program
  (b, g, s) takes the s-th range of blocks and stores its unnormalised (acc, m, l), which one
  small XLA fusion merges (flash-decoding); splits whose range lies past ``index`` store l = 0;
- valid slots: ``mask[b, s] and s <= index``; keys and values are cast to q's dtype (the model's
  compute dtype, as the XLA path does), scores ``q . k / sqrt(hd)`` are float32, and the
  probabilities enter the PV dot in that dtype, like the XLA path's ``probs.astype(v.dtype)``;
- a row with no valid slot gets zeros (the XLA path's softmax over all-masked scores averages
  every slot instead; a decode step always sees its own slot, so this does not arise there).

The G query rows are padded to ``GP = max(16, next_pow2(G))`` rows inside the kernel (masked
load and store): Triton's dots need >= 16 rows. Scope: `supported` (head_dim a power of two
>= 16, S a multiple of 16, 16/32-bit floats).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat

#: Cache slots per loop step (fewer if S has fewer trailing factors of two).
BLOCK_S = 64
#: Programs to aim for when splitting the cache walk (about one per SM of an H100).
TARGET_PROGRAMS = 128
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
_NEG = np.float32(-1e30)  # finite: exp(_NEG - m) is 0, and _NEG - _NEG is no NaN


def block_s_for(s: int) -> int:
    """Largest power of two <= `BLOCK_S` dividing ``s`` (0 if below 16)."""
    bs = BLOCK_S
    while bs >= 16 and s % bs:
        bs //= 2
    return bs if bs >= 16 else 0


def problems(q_shape, cache_shape, dtype, cache_dtype) -> list[str]:
    """What keeps the kernel from these operands (empty when it applies)."""
    out = []
    if len(q_shape) != 3 or len(cache_shape) != 4:
        return [f"want q (B, Hq, hd) and caches (B, S, Hkv, hd), got {q_shape} and {cache_shape}"]
    b, hq, hd = q_shape
    cb, s, hkv, chd = cache_shape
    if (cb, chd) != (b, hd) or hkv < 1 or hq % hkv:
        out.append(f"q {q_shape} does not match caches {cache_shape} (Hq a multiple of Hkv)")
    if hd < 16 or hd & (hd - 1):
        out.append(f"head_dim={hd} is not a power of two >= 16")
    if not block_s_for(s):
        out.append(f"cache length S={s} is not a multiple of 16")
    for name, dt in (("q", dtype), ("cache", cache_dtype)):
        if jnp.dtype(dt) not in [jnp.dtype(f) for f in _FLOATS]:
            out.append(f"{name} dtype {jnp.dtype(dt).name} is not float32/bfloat16/float16")
    return out


def _kernel(
    idx_ref, q_ref, kn_ref, vn_ref, m_ref, kc_ref, vc_ref, *outs,
    g_heads: int, gp: int, bs: int, s_len: int, scale: float, splits: int, per_split: int,
):
    if splits == 1:
        o_ref, ko_ref, vo_ref = outs
    else:
        acc_ref, mx_ref, l_ref, ko_ref, vo_ref = outs
    b = pl.program_id(0)
    g = pl.program_id(1)
    sp = pl.program_id(2)
    index = idx_ref[0]
    slot = jnp.minimum(index, s_len - 1)
    rows = lax.broadcasted_iota(jnp.int32, (gp, 1), 0)
    row_ok = rows < g_heads
    hd = q_ref.shape[-1]
    row_ok = jnp.broadcast_to(row_ok, (gp, hd))
    q = _compat.load(q_ref.at[b, pl.ds(g * g_heads, gp), :], mask=row_ok, other=0)
    kn = kn_ref[b, g, :]
    vn = vn_ref[b, g, :]

    @pl.when(sp == 0)
    def _():
        ko_ref[b, slot, g, :] = kn.astype(ko_ref.dtype)
        vo_ref[b, slot, g, :] = vn.astype(vo_ref.dtype)

    kn_row = kn.astype(kc_ref.dtype)[None, :]
    vn_row = vn.astype(vc_ref.dtype)[None, :]
    # float32 operands: full-precision FMA dots (Triton would round them to tf32 otherwise)
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def step(j, carry):
        m_i, l_i, acc = carry
        s0 = pl.multiple_of(j * bs, bs)
        slots = s0 + lax.broadcasted_iota(jnp.int32, (bs, 1), 0)
        is_new = slots == slot
        kb = jnp.where(is_new, kn_row, kc_ref[b, pl.ds(s0, bs), g, :]).astype(q.dtype)
        vb = jnp.where(is_new, vn_row, vc_ref[b, pl.ds(s0, bs), g, :]).astype(q.dtype)
        sc = lax.dot_general(
            q, kb, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
        ) * np.float32(scale)
        cols = s0 + lax.broadcasted_iota(jnp.int32, (1, bs), 1)
        ok = (m_ref[pl.ds(b, 1), pl.ds(s0, bs)] != 0) & (cols <= index)
        sc = jnp.where(ok, sc, _NEG)
        m_new = jnp.maximum(m_i, jnp.max(sc, axis=1, keepdims=True))
        p = jnp.where(ok, jnp.exp(sc - m_new), np.float32(0))
        alpha = jnp.exp(m_i - m_new)
        l_new = alpha * l_i + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(vb.dtype), vb, precision=prec, preferred_element_type=jnp.float32)
        return m_new, l_new, acc * alpha + pv

    n_blocks = jnp.minimum(index // bs + 1, s_len // bs)
    lo = sp * per_split
    hi = jnp.minimum(lo + per_split, n_blocks)
    init = (
        jnp.full((gp, 1), _NEG, jnp.float32),
        jnp.zeros((gp, 1), jnp.float32),
        jnp.zeros((gp, hd), jnp.float32),
    )
    m_i, l_i, acc = lax.fori_loop(lo, jnp.maximum(lo, hi), step, init)
    if splits == 1:
        out = jnp.where(l_i > 0, acc / jnp.where(l_i > 0, l_i, np.float32(1)), np.float32(0))
        _compat.store(o_ref.at[b, pl.ds(g * g_heads, gp), :], out.astype(o_ref.dtype), mask=row_ok)
    else:  # unnormalised partials of this split's slots; `_combine` merges the splits
        acc_ref[b, g, sp, :, :] = acc
        mx_ref[b, g, sp, :] = jnp.max(m_i, axis=1)
        l_ref[b, g, sp, :] = jnp.sum(l_i, axis=1)


def _combine(acc: jax.Array, mx: jax.Array, l: jax.Array) -> jax.Array:
    """(B, Hkv, NS, GP, hd), (B, Hkv, NS, GP) x 2 -> (B, Hkv, GP, hd): the softmax-weighted
    merge of the splits' partial sums (splits without a visible slot have l = 0)."""
    top = jnp.max(mx, axis=2, keepdims=True)
    w = jnp.where(l > 0, jnp.exp(mx - top), 0.0)
    den = jnp.sum(w * l, axis=2)
    num = jnp.sum(w[..., None] * acc, axis=2)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


def splits_for(batch: int, kv_heads: int, blocks: int) -> int:
    """Cache splits per (row, KV head): enough programs for `TARGET_PROGRAMS`, at most one per
    block of slots (1 once batch x KV heads fill the GPU: no partials to merge then)."""
    return max(1, min(blocks, -(-TARGET_PROGRAMS // (batch * kv_heads))))


def decode_attention_pallas(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    index: jax.Array | int,
    mask: jax.Array,
    *,
    interpret: bool = False,
    num_warps: int = 4,
    splits: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(out (B, Hq, hd) in q's dtype, new k cache, new v cache); see the module docstring.

    q: (B, Hq, hd) (RoPE applied); k_new, v_new: (B, Hkv, hd); caches (B, S, Hkv, hd);
    index: int32 scalar, the new token's slot; mask: bool (B, S), key slots the row may see
    (``s <= index`` is applied on top). The caches are updated in place where XLA can alias
    them (donate them, or carry them through a loop). ``splits``: programs per (row, KV head)
    walking disjoint ranges of cache blocks (default `splits_for`); with more than one, each
    writes float32 partial sums that one small XLA fusion merges (`_combine`)."""
    bad = problems(q.shape, k_cache.shape, q.dtype, k_cache.dtype)
    b, hq, hd = q.shape
    _, s_len, hkv, _ = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        bad.append(f"v cache {v_cache.shape} {v_cache.dtype} differs from k cache "
                   f"{k_cache.shape} {k_cache.dtype}")
    for name, a in (("k_new", k_new), ("v_new", v_new)):
        if a.shape != (b, hkv, hd):
            bad.append(f"{name} has shape {a.shape}, want {(b, hkv, hd)}")
    if mask.shape != (b, s_len):
        bad.append(f"mask has shape {mask.shape}, want {(b, s_len)}")
    if jnp.ndim(index) != 0:
        bad.append(f"index must be a scalar, got shape {jnp.shape(index)}")
    if bad:
        raise ValueError("decode_attention: " + "; ".join(bad))
    g_heads = hq // hkv
    gp = max(16, 1 << (g_heads - 1).bit_length())
    bs = block_s_for(s_len)
    blocks = s_len // bs
    if splits is None:
        splits = splits_for(b, hkv, blocks)
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= blocks:
        raise ValueError(f"decode_attention: splits must be an int in 1..{blocks} (blocks of "
                         f"{bs} slots), got {splits!r}")
    per_split = -(-blocks // splits)
    idx = jnp.asarray(index, jnp.int32).reshape(1)
    m32 = mask.astype(jnp.int32)
    qq = q
    out_rows = hq
    if interpret:  # interpret mode clamps a window that runs past the end: pad instead of masking
        qq = jnp.pad(q, [(0, 0), (0, gp), (0, 0)])
        out_rows = hq + gp
    body = functools.partial(
        _kernel, g_heads=g_heads, gp=gp, bs=bs, s_len=s_len, scale=1.0 / math.sqrt(hd),
        splits=splits, per_split=per_split,
    )
    caches = (
        jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
        jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
    )
    if splits == 1:
        head = (jax.ShapeDtypeStruct((b, out_rows, hd), q.dtype),)
    else:
        head = (
            jax.ShapeDtypeStruct((b, hkv, splits, gp, hd), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
        )
    n_head = len(head)
    with _compat.quiet_triton_deprecation():
        res = pl.pallas_call(
            body,
            out_shape=head + caches,
            grid=(b, hkv, splits),
            input_output_aliases={5: n_head, 6: n_head + 1},
            compiler_params=None if interpret else _compat.compiler_params(num_warps, 2),
            interpret=interpret,
            name=f"decode_attention_g{g_heads}_hd{hd}" + (f"_s{splits}" if splits > 1 else ""),
        )(idx, qq, k_new, v_new, m32, k_cache, v_cache)
    kc, vc = res[n_head:]
    if splits == 1:
        return res[0][:, :hq], kc, vc
    out = _combine(*res[:3])[:, :, :g_heads].reshape(b, hq, hd)
    return out.astype(q.dtype), kc, vc
