"""Inference-time fusion of the linear layers that read the same input (fewer, wider matmuls).

Glossary: K = contraction dim (rows of a Flax kernel), N = output columns, group = layers that
read the same activations (q/k/v read the attention input, gate/up the MLP input).

`fuse_projections(params)` replaces, in every decoder block, ``attn/{q,k,v}_proj`` by one
``attn/qkv_proj`` and ``mlp/{gate,up}_proj`` by one ``mlp/gate_up_proj`` whose kernel is the
column concatenation of the originals (and whose bias is the concatenation of theirs; a
missing bias among present ones becomes zeros, so nothing is dropped). The Llama model
(`higgs_jax.models.llama.decoder_block`) accepts either form and splits the fused output by
the config's widths, so the result is the same function with one matmul launch per group
instead of three or two; with HIGGS weights the activation rotation is also done once.

Quantized kernels fuse when they are the same kind of leaf (`HiggsTensor` or the GPU kernel's
`KernelPackedWeight`) with identical quantization metadata (grid, h, g, K padding, dtype) and
identical random signs (the rotation of the shared input must be the same); outliers are kept
(column indices shifted). Plain arrays fuse with plain arrays of the same dtype. A group that
cannot be fused is left as it is and reported with the reason (e.g. dynamic bit allocation gave
q and k different grids). Fusion is for inference: quantization, calibration and checkpoints
use the unfused names. `prepare_for_inference` combines it with the one-time repack into the
GPU kernel's layout.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_log = logging.getLogger(__name__)

#: (sub-module, layers read from the same input, fused name), Llama family.
LLAMA_GROUPS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"),
)

_CODE_FIELD = {"HiggsTensor": "codes", "KernelPackedWeight": "words"}


def _kind(w) -> str:
    name = type(w).__name__
    if name in _CODE_FIELD:
        return name
    if isinstance(w, (jax.Array, np.ndarray)):
        return "array"
    return name


def _meta(w) -> dict:
    skip = {"shape", "codes", "words", "scales", "signs"}
    skip |= {"outlier_rows", "outlier_cols", "outlier_values"}
    return {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name not in skip}


def why_not_fusable(kernels: Sequence[Any]) -> str | None:
    """None if `concat_columns` can fuse these (K, N_i) kernels, else the reason."""
    kinds = {_kind(w) for w in kernels}
    if len(kinds) != 1:
        return f"mixed leaf types {sorted(kinds)}"
    (kind,) = kinds
    if kind == "array":
        dtypes = {str(w.dtype) for w in kernels}
        if len(dtypes) != 1:
            return f"mixed dtypes {sorted(dtypes)}"
        ks = {w.shape[0] for w in kernels}
        if len(ks) != 1 or any(w.ndim != 2 for w in kernels):
            return f"not 2-D kernels with one K: shapes {[tuple(w.shape) for w in kernels]}"
        return None
    if kind not in _CODE_FIELD:
        return f"unsupported leaf type {kind}"
    if any(getattr(w, "contraction_axis", 0) != 0 for w in kernels):
        return "a kernel is quantized along axis 1"
    ks = {w.shape[0] for w in kernels}
    if len(ks) != 1:
        return f"different K {sorted(ks)}"
    metas = [_meta(w) for w in kernels]
    for m in metas[1:]:
        diff = sorted(k for k in m if m[k] != metas[0][k])
        if diff:
            return "different quantization settings: " + ", ".join(
                f"{k} {metas[0][k]!r} vs {m[k]!r}" for k in diff
            )
    signs = [w.signs for w in kernels]
    if any(s is None for s in signs) != all(s is None for s in signs):
        return "random signs on some kernels only"
    if signs[0] is not None:
        s0 = np.asarray(signs[0])
        if any(not np.array_equal(s0, np.asarray(s)) for s in signs[1:]):
            return "different random signs (the shared input would need different rotations)"
    return None


def concat_columns(kernels: Sequence[Any]):
    """One (K, sum N_i) kernel equal to the column concatenation of (K, N_i) kernels.

    Works for plain arrays, `HiggsTensor` and `KernelPackedWeight` (packed codes and scales are
    per column, so the concatenation is exact; outlier column indices are shifted).

    Raises:
      ValueError: if the kernels cannot be fused (`why_not_fusable` names the reason).
    """
    if len(kernels) < 2:
        raise ValueError(f"need at least two kernels to fuse, got {len(kernels)}")
    why = why_not_fusable(kernels)
    if why is not None:
        raise ValueError(f"cannot fuse kernels of shapes {[tuple(w.shape) for w in kernels]}: {why}")
    first = kernels[0]
    if _kind(first) == "array":
        return jnp.concatenate(list(kernels), axis=1)
    field = _CODE_FIELD[_kind(first)]
    n_total = sum(int(w.shape[1]) for w in kernels)
    changes = {
        field: jnp.concatenate([getattr(w, field) for w in kernels], axis=-1),
        "scales": jnp.concatenate([w.scales for w in kernels], axis=-1),
        "shape": (int(first.shape[0]), n_total),
    }
    if any(getattr(w, "outlier_values", None) is not None for w in kernels):
        rows, cols, vals, off = [], [], [], 0
        for w in kernels:
            if w.outlier_values is not None:
                rows.append(jnp.asarray(w.outlier_rows, jnp.int32))
                cols.append(jnp.asarray(w.outlier_cols, jnp.int32) + off)
                vals.append(jnp.asarray(w.outlier_values, jnp.float32))
            off += int(w.shape[1])
        changes.update(
            outlier_rows=jnp.concatenate(rows),
            outlier_cols=jnp.concatenate(cols),
            outlier_values=jnp.concatenate(vals),
        )
    return dataclasses.replace(first, **changes)


def _fuse_bias(layers: Sequence[Mapping[str, Any]], kernels) -> Any:
    biases = [lp.get("bias") for lp in layers]
    if all(b is None for b in biases):
        return None
    dtype = next(b.dtype for b in biases if b is not None)
    return jnp.concatenate(
        [
            b.astype(dtype) if b is not None else jnp.zeros((int(k.shape[1]),), dtype)
            for b, k in zip(biases, kernels)
        ]
    )


def fuse_projections(
    params: Mapping[str, Any], groups=LLAMA_GROUPS
) -> tuple[dict, list[dict]]:
    """Fuses every group of shared-input linears in each ``layers_i`` block of `params`.

    Returns:
      (new params, report): one report entry per (block, group): ``{"layer", "fused", "into",
      "reason"}`` (reason is None when fused). Blocks or groups that are absent are skipped.

    Raises:
      ValueError: if `params` has no ``layers_*`` blocks, or a block already holds the fused
        name next to the unfused layers (ambiguous).
    """
    blocks = [k for k in params if str(k).startswith("layers_")]
    if not blocks:
        raise ValueError(f"no 'layers_*' blocks in params (top-level keys: {sorted(params)[:8]})")
    out = dict(params)
    report = []
    for b in blocks:
        block = dict(params[b])
        for sub, names, fused in groups:
            if sub not in block:
                continue
            mod = dict(block[sub])
            if not all(n in mod for n in names):
                continue
            if fused in mod:
                raise ValueError(f"{b}/{sub} has both {fused!r} and {names}")
            layers = [mod[n] for n in names]
            kernels = [lp["kernel"] for lp in layers]
            why = why_not_fusable(kernels)
            report.append({"layer": f"{b}/{sub}", "fused": why is None, "into": fused, "reason": why})
            if why is not None:
                continue
            new = {"kernel": concat_columns(kernels)}
            bias = _fuse_bias(layers, kernels)
            if bias is not None:
                new["bias"] = bias
            for n in names:
                del mod[n]
            mod[fused] = new
            block[sub] = mod
        out[b] = block
    return out, report


#: Decode batch from which ``prepare_for_inference(kernel_layout="auto", batch_size=B)`` picks
#: the nk16 layout on a GPU. H100, session 17 (`benchmarks/results/s17/kernel_table/TABLE.md`,
#: 8192x28672): M = 4 4-bit 66.2 us on nk16 against 102.8 in the default layout (2-bit 56.4 vs
#: 78.0); M = 1 4-bit 65.7 vs 64.4 and 2-bit 57.2 vs 51.7 (the default layout wins at batch 1).
NK16_MIN_BATCH = 4


def prepare_for_inference(
    params: Mapping[str, Any],
    *,
    fuse: bool = True,
    kernel_layout: bool | str = "auto",
    batch_size: int | None = None,
) -> tuple[dict, list[dict]]:
    """Load-time preparation of quantized Llama params for decoding.

    1. ``kernel_layout``: repack every `HiggsTensor` once into the Pallas kernel layout
       (`pallas_kernels.higgs_matmul.repack`; free for 2/4/8-bit codes, a bit shuffle for 3/6).
       "auto" does it only on an NVIDIA GPU where the kernel runs; True forces it (the model then
       needs the kernel: NVIDIA GPU); False keeps `HiggsTensor` leaves (XLA path anywhere).
       "nk16": as True, then (after fusing) every weight the kernel's "nk" path takes (p = 1,
       2- or 4-bit codes, scale groups of multiples of 512; `repack.nk16_problem`) goes to the
       nk16 layout (`repack.to_nk16_tree`), the layout for batched decoding and prefill
       (bfloat16 activations for 4-bit codes). On an H100 (benchmarks/RESULTS.md §6, sessions
       14 and 17) it is faster from M = 4 up (8192x28672 at 4 bits: 2.35x / 2.44x / 1.23x of
       cuBLAS at M = 4 / 16 / 64, against 1.52x / 1.57x / 0.79x in the default layout; 32-layer
       decode at batch 16 1.53x of bf16) and slower at M = 1 (batch-1 decode 1.55x against
       1.85x). The weights that stay in the default layout are logged.
    2. ``fuse``: `fuse_projections` (one matmul per shared input).

    ``batch_size``: the decode batch these params will serve (rows of x per matmul in a decode
    step), a hint for ``kernel_layout="auto"``: on an NVIDIA GPU, ``batch_size >=``
    `NK16_MIN_BATCH` picks "nk16", smaller batches (or None) the default layout. Ignored by the
    explicit layouts; off the GPU "auto" keeps `HiggsTensor` leaves either way.

    Returns:
      (params, fusion report); the report is empty when ``fuse`` is False.

    Raises:
      ValueError: ``kernel_layout`` is not True/False/"auto"/"nk16", or True/"nk16" without
        `pallas_kernels`; ``batch_size`` is not None or a positive int.
    """
    if kernel_layout not in (True, False, "auto", "nk16"):
        raise ValueError(
            f"kernel_layout must be True, False, 'auto' or 'nk16', got {kernel_layout!r}"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    nk16 = kernel_layout == "nk16"
    if nk16:
        kernel_layout = True
    out: Any = params
    if kernel_layout:
        try:
            from pallas_kernels import _compat
            from pallas_kernels.higgs_matmul import repack
        except ImportError as e:
            if kernel_layout is True:
                raise ValueError(f"kernel_layout=True needs pallas_kernels: {e}") from e
            repack = None
        cc = None if repack is None else _compat.gpu_compute_capability()
        on_gpu = cc is not None and cc >= _compat.MIN_COMPUTE_CAPABILITY
        if kernel_layout == "auto" and on_gpu and (batch_size or 0) >= NK16_MIN_BATCH:
            nk16 = True
            _log.info("batch_size=%d >= %d on a GPU: the nk16 layout", batch_size, NK16_MIN_BATCH)
        if repack is not None and (kernel_layout is True or on_gpu):
            from higgs_jax.qtensor import HiggsTensor
            from pallas_kernels.higgs_matmul.wrapper import weight_problems

            rp = jax.jit(repack)
            out = jax.tree_util.tree_map(
                # what the kernel runs is repacked; the rest stays on the XLA path
                lambda x: rp(x) if isinstance(x, HiggsTensor) and not weight_problems(x) else x,
                out,
                is_leaf=lambda x: isinstance(x, HiggsTensor),
            )
    report: list[dict] = []
    if fuse:
        out, report = fuse_projections(out)
    if nk16:
        from pallas_kernels.higgs_matmul.repack import to_nk16_tree

        out, n_conv, kept = to_nk16_tree(out)
        _log.info(
            "nk16 layout: %d weights converted, %d kept in the default layout", n_conv, len(kept)
        )
        for where, why in kept.items():
            _log.info("  kept %s: %s", where, why)
    return dict(out), report
