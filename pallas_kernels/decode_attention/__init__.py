"""One decode step of grouped-query attention (cache update + masked softmax attention).

`decode_attention(..., implementation="auto" | "xla" | "pallas", interpret=None)`: "auto" takes
the Pallas kernel (`kernel.py`, one launch) on an NVIDIA GPU where `can_use_pallas` says it
applies, and the plain-jnp reference (XLA) elsewhere; "pallas" raises with the reason where it
cannot run. Both return ``(out (B, Hq, hd), new k cache, new v cache)``.
"""

from __future__ import annotations

import jax

from pallas_kernels import _compat
from pallas_kernels.decode_attention.kernel import decode_attention_pallas, problems
from pallas_kernels.decode_attention.reference import decode_attention_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def can_use_pallas(q: jax.Array, k_cache: jax.Array) -> tuple[bool, str]:
    """(True, "ok") where the kernel runs these operands on this machine, else (False, why)."""
    out = problems(q.shape, k_cache.shape, q.dtype, k_cache.dtype)
    cc = _compat.gpu_compute_capability()
    if cc is None:
        out.append(f"backend {jax.default_backend()!r} is not an NVIDIA GPU")
    elif cc < _compat.MIN_COMPUTE_CAPABILITY:
        out.append(f"compute capability {cc} < {_compat.MIN_COMPUTE_CAPABILITY} (Triton)")
    return (not out, "; ".join(out) or "ok")


def decode_attention(
    q, k_new, v_new, k_cache, v_cache, index, mask, *, implementation="auto", interpret=None
):
    """See the module docstring; ``interpret=True`` runs the kernel in Pallas interpret mode
    (CPU tests) and implies the kernel."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if interpret:
        if implementation == "xla":
            raise ValueError("interpret=True runs the Pallas kernel; it contradicts 'xla'")
        return decode_attention_pallas(
            q, k_new, v_new, k_cache, v_cache, index, mask, interpret=True
        )
    if implementation == "xla":
        return decode_attention_reference(q, k_new, v_new, k_cache, v_cache, index, mask)
    ok, why = can_use_pallas(q, k_cache)
    if not ok:
        if implementation == "pallas":
            raise ValueError(f"implementation='pallas' is not available here: {why}")
        return decode_attention_reference(q, k_new, v_new, k_cache, v_cache, index, mask)
    return decode_attention_pallas(q, k_new, v_new, k_cache, v_cache, index, mask)


__all__ = [
    "can_use_pallas",
    "decode_attention",
    "decode_attention_pallas",
    "decode_attention_reference",
    "problems",
]
