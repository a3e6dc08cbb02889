"""Dynamic HIGGS: per-layer options, their error and bit cost, and the DP plan as a params plan.

Glossary: option = a HIGGS config (grid (p, n), Hadamard size) or "keep" (bf16, error 0);
t^2(l, j) = relative error of layer l under option j; bits(l, j) = bits/weight incl. scales and
padding (depends on the layer's K through padding); alpha_l from `calibrate`.

Error model: with HIGGS, t^2 ~= the grid's Gaussian MSE whatever the layer ("data-free"
shortcut, SPEC §2); `error_table(..., measure=True)` instead quantizes every layer with every
option and records the real t^2, so the shortcut can be checked (`shortcut_report`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from higgs_jax import grids
from higgs_jax.config import HiggsConfig
from higgs_jax.params import DEFAULT_RULES, LayerPlan, plan_quantization, path_str
from higgs_jax.quantize import expected_bits_per_weight, quantize_with_error

KEEP = "keep"
KEEP_BITS = 16.0  # a kept layer stays in bf16


def default_options(hadamard_size: int = 512, include_keep: bool = False) -> tuple:
    """HIGGS options from 1.5 to 8 bits/weight over the shipped grids with p <= 2 (what the
    kernels support) plus p = 3, 4 where grids exist."""
    opts: list[Any] = []
    for p, n in grids.available_grids():
        b = np.log2(n) / p
        if 1.5 <= b <= 8 and p <= 4:
            opts.append(HiggsConfig(bits=float(b) if b != int(b) else int(b), p=p,
                                    hadamard_size=hadamard_size))
    if include_keep:
        opts.append(KEEP)
    return tuple(opts)


def option_name(opt) -> str:
    return KEEP if opt == KEEP else opt.describe()


def _grid_mse(spec: HiggsConfig) -> float:
    ref = grids.SPEC_GRID_MSE.get((spec.p, spec.n))
    return float(ref) if ref is not None else float(grids.grid_mse(spec.grid, 1 << 18))


@dataclasses.dataclass(frozen=True)
class ErrorTable:
    layers: tuple[str, ...]
    sizes: np.ndarray  # (L,)
    options: tuple  # J options (QuantSpec or KEEP)
    errors: np.ndarray  # (L, J) t^2
    bits: np.ndarray  # (L, J) bits/weight
    measured: bool

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(option_name(o) for o in self.options)


def error_table(
    params: Any,
    options: Sequence,
    *,
    rules=DEFAULT_RULES,
    measure: bool = False,
    key=None,
    progress: bool = False,
) -> ErrorTable:
    """t^2 and bits/weight of every (layer, option) for the layers the rules quantize.

    `params` may be abstract (ShapeDtypeStruct) when `measure` is False.
    """
    if not options:
        raise ValueError("options is empty")
    for o in options:
        if o != KEEP and not isinstance(o, HiggsConfig):
            raise ValueError(f"dynamic options must be HiggsConfig or 'keep', got {o!r}")
    plan = plan_quantization(params, rules)
    layers = [p for p, lp in plan.items() if lp.spec is not None]
    if not layers:
        raise ValueError("the rules select no layer")
    L, J = len(layers), len(options)
    errors = np.zeros((L, J))
    bits = np.zeros((L, J))
    leaves = {}
    if measure:
        import jax

        leaves = {path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    bar = None
    if progress and measure:
        from tqdm.auto import tqdm

        bar = tqdm(total=L * J, desc="error table", unit="quant")
    for i, path in enumerate(layers):
        lp = plan[path]
        for j, o in enumerate(options):
            if o == KEEP:
                errors[i, j], bits[i, j] = 0.0, KEEP_BITS
                continue
            bits[i, j] = expected_bits_per_weight(lp.shape, o, lp.axis)
            if measure:
                _, errors[i, j] = quantize_with_error(leaves[path], o, axis=lp.axis, key=key)
                if bar is not None:
                    bar.update(1)
            else:
                errors[i, j] = _grid_mse(o)
    if bar is not None:
        bar.close()
    sizes = np.asarray([plan[p].numel for p in layers], np.int64)
    return ErrorTable(tuple(layers), sizes, tuple(options), errors, bits, measure)


def shortcut_report(measured: ErrorTable, shortcut: ErrorTable) -> dict:
    """How far the data-free t^2 ~= grid MSE shortcut is from the measured t^2."""
    rel = measured.errors / np.where(shortcut.errors > 0, shortcut.errors, 1) - 1
    mask = shortcut.errors > 0
    return {
        "median_rel_dev": float(np.median(np.abs(rel[mask]))),
        "max_rel_dev": float(np.max(np.abs(rel[mask]))),
        "mean_rel_dev": float(np.mean(rel[mask])),
    }


def plan_from_choices(params: Any, table: ErrorTable, choices: Sequence[int], *,
                      rules=DEFAULT_RULES) -> dict[str, LayerPlan]:
    """A `quantize_params(plan=...)` plan where layer l gets option choices[l]."""
    base = plan_quantization(params, rules)
    out = dict(base)
    for path, j in zip(table.layers, choices):
        lp = base[path]
        o = table.options[int(j)]
        if o == KEEP:
            out[path] = dataclasses.replace(lp, spec=None, reason="kept: dynamic plan chose bf16",
                                            bits_per_weight=KEEP_BITS)
        else:
            out[path] = dataclasses.replace(
                lp, spec=o, reason=f"dynamic plan: {o.describe()}",
                bits_per_weight=expected_bits_per_weight(lp.shape, o, lp.axis))
    return out


def solve_dynamic(table: ErrorTable, alphas: Mapping[str, float] | Sequence[float],
                  budget_bits_per_weight: float, *, num_bins: int = 2000):
    """Solves the knapsack with the DP; returns the AllocationPlan."""
    from higgs_jax.allocation.dp import AllocationProblem, solve

    if isinstance(alphas, Mapping):
        missing = [p for p in table.layers if p not in alphas]
        if missing:
            raise ValueError(f"alphas missing for layers {missing[:5]}")
        a = np.asarray([alphas[p] for p in table.layers], float)
    else:
        a = np.asarray(alphas, float)
    problem = AllocationProblem(alphas=a, errors=table.errors, bits=table.bits, sizes=table.sizes,
                                layer_names=table.layers, option_names=table.option_names)
    return solve(problem, budget_bits_per_weight, num_bins=num_bins)


def uniform_choice(table: ErrorTable, option_index: int) -> np.ndarray:
    return np.full(len(table.layers), option_index, dtype=np.int64)


def predicted_delta(table: ErrorTable, alphas: Sequence[float], choices: Sequence[int]) -> float:
    a = np.asarray(alphas, float)
    return float(np.sum(a * table.errors[np.arange(len(a)), np.asarray(choices)]))


def average_bits(table: ErrorTable, choices: Sequence[int]) -> float:
    c = np.asarray(choices)
    return float(np.sum(table.sizes * table.bits[np.arange(len(c)), c]) / np.sum(table.sizes))

