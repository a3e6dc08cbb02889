"""Every backend-specific Pallas Triton call lives here.

The Triton backend of Pallas is deprecated upstream from jax 0.11 (it warns on use) and its API
has moved before (``TritonCompilerParams`` -> ``CompilerParams``). Kernels import the helpers
below instead of touching ``jax.experimental.pallas.triton`` directly, so a future move is a
one-file change.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import jax

# Triton supports NVIDIA GPUs from compute capability 8.0 (Ampere) in current releases; older
# chips (T4 is 7.5) still compile for most kernels but Triton dropped official support.
MIN_COMPUTE_CAPABILITY = (7, 5)


@contextlib.contextmanager
def quiet_triton_deprecation():
    """Silences the Triton-backend deprecation warning jax >= 0.11 emits on import and lowering."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Tt]riton.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*[Tt]riton.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*[Tt]riton.*", category=UserWarning)
        yield


def _plgpu():
    with quiet_triton_deprecation():
        from jax.experimental.pallas import triton as plgpu
    return plgpu


def compiler_params(num_warps: int, num_stages: int) -> Any:
    """Backend compiler params for ``pallas_call`` (name differs across jax versions)."""
    plgpu = _plgpu()
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def load(ref_at: Any, *, mask: jax.Array | None = None, other: Any = None) -> jax.Array:
    """Masked load of a ref view (``ref.at[...]``); a plain ``ref[...]`` when unmasked."""
    if mask is None:
        return ref_at[...]
    return _plgpu().load(ref_at, mask=mask, other=other)


def store(ref_at: Any, val: jax.Array, *, mask: jax.Array | None = None) -> None:
    if mask is None:
        ref_at[...] = val
        return
    _plgpu().store(ref_at, val, mask=mask)


def gpu_compute_capability(device: Any | None = None) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA GPU device, None for anything else."""
    try:
        device = device or jax.devices()[0]
    except RuntimeError:
        return None
    if device.platform != "gpu":
        return None
    kind = getattr(device, "device_kind", "") or ""
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return None if "nvidia" not in kind.lower() and "h100" not in kind.lower() else (9, 0)
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def device_kind(device: Any | None = None) -> str:
    device = device or jax.devices()[0]
    return str(getattr(device, "device_kind", device.platform)).replace(" ", "_")
