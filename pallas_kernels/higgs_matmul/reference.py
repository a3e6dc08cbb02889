"""Plain-jnp reference for the HIGGS matmul: decode the whole weight, then one f32 matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.higgs_matmul.repack import kernel_codes, repack
from pallas_kernels.higgs_matmul.wrapper import apply_outliers, rotate_activations


def decode_rotated(kw) -> jax.Array:
    """Wrot (K_pad, N) float32 from a `KernelPackedWeight` (grid lookup times scales)."""
    codes = kernel_codes(kw)[: kw.k_pad // kw.p]  # (Kc, N)
    lut = jnp.asarray(np.asarray(kw.grid_values, np.float32))  # (n, p)
    vals = jnp.take(lut, codes, axis=0)  # (Kc, N, p)
    vals = jnp.swapaxes(vals, 1, 2).reshape(kw.k_pad, kw.N)
    return vals * jnp.repeat(kw.scales.astype(jnp.float32), kw.group_size, axis=0)


def higgs_matmul_reference(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
    """``x @ dequantize(w) (+ bias)`` in plain jnp (f32, HIGHEST precision); x's dtype out."""
    kw = repack(w)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kw.K)
    y = jnp.matmul(
        rotate_activations(x2, kw), decode_rotated(kw), precision=jax.lax.Precision.HIGHEST
    )
    y = apply_outliers(kw, x2, y)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype).reshape(lead + (kw.N,))
