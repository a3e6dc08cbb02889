"""Linear-layer dispatch on the leaf type, and the quantized matmul `y = x @ W_hat`.

`linear(x, kernel, bias)` is what models call: a plain array kernel gives ``x @ kernel``, a
`HiggsTensor` gives `higgs_matmul`; the bias is always added (never dropped).

`higgs_matmul` has two implementations:
- "xla": rotate x block-wise (Hadamard, incl. non-power-of-two orders), decode W in the rotated
  domain (LUT lookup x scales) and dot in float32. Runs everywhere.
- "pallas": the Pallas Triton kernel of `pallas_kernels.higgs_matmul` (NVIDIA GPUs).
"auto" takes Pallas where `can_use_pallas` says it is supported and XLA otherwise. The Pallas
package is imported lazily, so `higgs_jax` never needs a GPU (or Triton) to import or run.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from higgs_jax.norms import norm_problems, rms_norm
from higgs_jax.qtensor import HiggsTensor, apply_outliers, decode_rotated, rotate_activations

Implementation = Literal["auto", "xla", "pallas"]
_IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _pallas_module():
    try:
        from pallas_kernels import higgs_matmul as module
    except ImportError:
        return None
    return module


def higgs_matmul_xla(x: jax.Array, qt: HiggsTensor, bias: jax.Array | None = None) -> jax.Array:
    """Reference-quality XLA path: (rotated x) @ (decoded rotated W), float32 accumulation."""
    _check_operands(x, qt)
    x_rot = rotate_activations(qt, x)
    w_rot = decode_rotated(qt)
    y = jnp.matmul(x_rot, w_rot, precision=jax.lax.Precision.HIGHEST)
    y = apply_outliers(qt, x, y)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _check_operands(x: jax.Array, qt: HiggsTensor) -> None:
    if not isinstance(qt, HiggsTensor):
        raise ValueError(f"expected a HiggsTensor, got {type(qt).__name__}")
    if qt.contraction_axis != 0:
        raise ValueError(
            f"quantized weight of shape {qt.shape} was quantized along axis 1; x @ W needs a "
            "(K, N) kernel quantized along axis 0"
        )
    if x.shape[-1] != qt.K:
        raise ValueError(f"x has last dim {x.shape[-1]} but the quantized kernel has K={qt.K}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")


def can_use_pallas(x: jax.Array, qt: HiggsTensor) -> tuple[bool, str]:
    """Whether the Pallas kernel supports this call here, and why not if it doesn't."""
    module = _pallas_module()
    if module is None:
        return False, "pallas_kernels could not be imported"
    return module.can_use_pallas(x, qt)


def _check_norm(x: jax.Array, norm_scale, norm_eps) -> None:
    if norm_scale is None and norm_eps is None:
        return
    problems = norm_problems(x, norm_scale, norm_eps)
    if problems:
        raise ValueError("; ".join(problems))


def higgs_matmul(
    x: jax.Array,
    qt: HiggsTensor,
    bias: jax.Array | None = None,
    *,
    implementation: Implementation = "auto",
    interpret: bool | None = None,
    norm_scale: jax.Array | None = None,
    norm_eps: float | None = None,
) -> jax.Array:
    """``x @ dequantize(qt) (+ bias)`` without materialising the dense weight.

    Args:
      x: activations (..., K), bf16/f16/f32.
      qt: quantized (K, N) kernel.
      bias: optional (N,) bias, always applied.
      implementation: "auto" (Pallas on supported NVIDIA GPUs, XLA elsewhere), "xla", "pallas".
      interpret: run the Pallas kernel in interpret mode (CPU testing); implies "pallas" is allowed
        off-GPU.
      norm_scale, norm_eps: give both to compute ``rms_norm(x, norm_scale, norm_eps) @ W``
        (`higgs_jax.norms.rms_norm`). The Pallas path can normalise inside its activation-
        rotation kernel (`pallas_kernels.higgs_matmul.Config.norm`, off by default).

    Returns:
      (..., N) in x's dtype.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    _check_operands(x, qt)
    _check_norm(x, norm_scale, norm_eps)
    use_xla = implementation == "xla" or (
        implementation == "auto" and not interpret and not can_use_pallas(x, qt)[0]
    )
    if use_xla:
        if norm_scale is not None:
            x = rms_norm(x, norm_scale, norm_eps)
        return higgs_matmul_xla(x, qt, bias)
    module = _pallas_module()
    if module is None:
        raise ValueError("implementation='pallas' but pallas_kernels is not importable")
    if not interpret:
        ok, why = module.can_use_pallas(x, qt)
        if not ok:
            raise ValueError(f"implementation='pallas' is not available here: {why}")
    return module.higgs_matmul_pallas(
        x, qt, bias=bias, interpret=bool(interpret), norm_scale=norm_scale, norm_eps=norm_eps
    )


def linear(
    x: jax.Array,
    kernel: Any,
    bias: jax.Array | None = None,
    *,
    implementation: Implementation = "auto",
    norm_scale: jax.Array | None = None,
    norm_eps: float | None = None,
) -> jax.Array:
    """``x @ kernel + bias`` for a Flax (in, out) kernel that is an array or a `HiggsTensor`;
    with ``norm_scale``/``norm_eps``, ``rms_norm(x) @ kernel + bias`` (see `higgs_matmul`)."""
    if isinstance(kernel, HiggsTensor):
        return higgs_matmul(
            x, kernel, bias, implementation=implementation, norm_scale=norm_scale, norm_eps=norm_eps
        )
    if type(kernel).__name__ == "KernelPackedWeight":  # repacked once for the GPU kernel
        module = _pallas_module()
        return module.higgs_matmul_pallas(
            x, kernel, bias=bias, norm_scale=norm_scale, norm_eps=norm_eps
        )
    _check_norm(x, norm_scale, norm_eps)
    if norm_scale is not None:
        x = rms_norm(x, norm_scale, norm_eps)
    y = jnp.matmul(x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
