"""Orbax save/restore of fp or quantized params trees.

Orbax stores arrays; a `HiggsTensor`'s static metadata (grid, h, g, shapes, ...) is not an array,
so the quantized tree is saved as a plain nested dict of arrays (each HiggsTensor becomes
``{"codes", "scales"[, "signs"]}``) plus ``higgs_meta.json`` that records, for every quantized
path, the metadata needed to rebuild the tensor. Restoring validates every rebuilt tensor.

Trees must be nested dicts (Linen params, our model's params, or ``nnx.State.to_pure_dict()``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from higgs_jax import grids
from higgs_jax.qtensor import HiggsTensor

META_FILE = "higgs_meta.json"
ARRAYS_DIR = "arrays"
FORMAT_VERSION = 1


def _flatten(tree: Any, prefix: str, meta: dict) -> Any:
    if isinstance(tree, HiggsTensor):
        meta[prefix] = {
            "shape": list(tree.shape),
            "dtype": tree.dtype,
            "grid": {"kind": tree.grid.kind, "p": tree.grid.p, "n": tree.grid.n},
            "hadamard_size": tree.hadamard_size,
            "group_size": tree.group_size,
            "k_pad": tree.k_pad,
            "contraction_axis": tree.contraction_axis,
            "has_signs": tree.signs is not None,
            "has_outliers": tree.outlier_values is not None,
        }
        out = {"codes": tree.codes, "scales": tree.scales}
        if tree.signs is not None:
            out["signs"] = tree.signs
        if tree.outlier_values is not None:
            out["outlier_rows"] = tree.outlier_rows
            out["outlier_cols"] = tree.outlier_cols
            out["outlier_values"] = tree.outlier_values
        return out
    if isinstance(tree, Mapping):
        return {str(k): _flatten(v, f"{prefix}/{k}" if prefix else str(k), meta) for k, v in tree.items()}
    if isinstance(tree, (jax.Array, np.ndarray)) or np.isscalar(tree):
        return tree
    raise ValueError(
        f"cannot save leaf at {prefix!r} of type {type(tree).__name__}: params must be nested dicts "
        "of arrays and HiggsTensors (convert NNX State with .to_pure_dict())"
    )


def _rebuild(tree: Any, prefix: str, meta: Mapping[str, dict]) -> Any:
    if prefix in meta:
        m = meta[prefix]
        qt = HiggsTensor(
            codes=tree["codes"],
            scales=tree["scales"],
            signs=tree.get("signs") if m["has_signs"] else None,
            shape=tuple(m["shape"]),
            dtype=m["dtype"],
            grid=grids.GridSpec(m["grid"]["kind"], m["grid"]["p"], m["grid"]["n"]),
            hadamard_size=m["hadamard_size"],
            group_size=m["group_size"],
            k_pad=m["k_pad"],
            contraction_axis=m["contraction_axis"],
            outlier_rows=tree["outlier_rows"] if m.get("has_outliers") else None,
            outlier_cols=tree["outlier_cols"] if m.get("has_outliers") else None,
            outlier_values=tree["outlier_values"] if m.get("has_outliers") else None,
        )
        try:
            qt.validate()
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {prefix!r} is inconsistent: {e}") from None
        return qt
    if isinstance(tree, Mapping):
        return {k: _rebuild(v, f"{prefix}/{k}" if prefix else k, meta) for k, v in tree.items()}
    return tree


def save_params(directory: str | Path, params: Any, *, metadata: Mapping | None = None) -> Path:
    """Saves `params` (fp or quantized) to `directory` (created; must not exist yet).

    Args:
      directory: target directory.
      params: nested dict of arrays / HiggsTensors.
      metadata: extra JSON-serialisable info stored beside (e.g. the model config, the report).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"checkpoint directory {directory} already exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    meta: dict[str, dict] = {}
    plain = _flatten(params, "", meta)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / ARRAYS_DIR, plain)
        ckptr.wait_until_finished()
    info = {"format_version": FORMAT_VERSION, "quantized": meta, "metadata": dict(metadata or {})}
    (directory / META_FILE).write_text(json.dumps(info, indent=1))
    return directory


def load_params(directory: str | Path) -> tuple[Any, dict]:
    """Restores a tree saved by `save_params`; returns (params, metadata)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{directory} is not a higgs-jax checkpoint (no {META_FILE})")
    info = json.loads(meta_path.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory}: checkpoint format_version {info.get('format_version')!r} is not "
            f"supported (expected {FORMAT_VERSION})"
        )
    with ocp.StandardCheckpointer() as ckptr:
        plain = ckptr.restore(directory / ARRAYS_DIR)
    return _rebuild(plain, "", info["quantized"]), info.get("metadata", {})
