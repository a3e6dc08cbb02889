"""RMSNorm, shared by the Flax model and the matmul entry points that can fuse it.

`higgs_jax.matmul.linear(..., norm_scale=, norm_eps=)` computes ``rms_norm(x) @ W``. On the
Pallas path with ``Config.norm = "kernel"`` the rotation kernel normalises each row itself, so
the two XLA kernels of the norm (the sum of squares and the scaling) are not launched
(`pallas_kernels.higgs_matmul.rotate`); every other route calls this function. The default is
"xla": the 32-layer decode measured the in-kernel norm slower on an H100 (`Config.norm`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def norm_problems(x, scale, eps) -> list[str]:
    """Why (scale, eps) is not an RMSNorm of x's last axis (empty: it is)."""
    out = []
    k = x.shape[-1] if hasattr(x, "shape") and x.ndim >= 1 else None
    if not hasattr(scale, "shape") or tuple(scale.shape) != (k,):
        got = getattr(scale, "shape", type(scale).__name__)
        out.append(f"norm_scale has shape {got}, want ({k},)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        out.append(f"norm_eps must be a positive float, got {eps!r}")
    return out
