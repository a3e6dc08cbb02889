"""alpha calibration by noise injection (linearity theorem, SPEC §2).

Glossary: t^2 = relative squared error of a layer, ||W_hat - W||^2 / ||W||^2; alpha_l = the
layer's sensitivity, dPPL ~= sum_l alpha_l * t_l^2 in the medium-bitwidth regime.

Procedure (the authors'): replace one layer's W by W + eps * ||W||_F / sqrt(numel) with eps ~
N(0, t^2) (so the relative error is t^2 in expectation), measure the perplexity increase on
calibration text, and fit dPPL = alpha * t^2 through the origin by least squares over the t^2
values in the linear regime. "block" mode perturbs every calibrated layer of one transformer
block at once (far fewer evaluations, for CPUs) and splits the block's alpha over its layers in
proportion to their sizes — an approximation; "layer" mode is exact per layer.

The evaluation function is jitted once: each perturbed tree has the same structure, so only
the values change between evaluations.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from higgs_jax.params import DEFAULT_RULES, plan_quantization

DEFAULT_T2 = (1 / 256, 1 / 128, 1 / 64)


@dataclasses.dataclass(frozen=True)
class AlphaTable:
    """Calibrated sensitivities; `layers` are param paths, `alphas` in PPL units per unit t^2."""

    layers: tuple[str, ...]
    alphas: tuple[float, ...]
    sizes: tuple[int, ...]
    base_ppl: float
    t2_values: tuple[float, ...]
    delta_ppl: tuple[tuple[float, ...], ...]  # per layer (or block), per t^2
    mode: str
    groups: tuple[str, ...]  # the unit each measurement perturbed (layer path or block prefix)
    meta: dict

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.layers, self.alphas))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> AlphaTable:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"alpha file {path} does not exist")
        d = json.loads(path.read_text())
        try:
            return cls(
                layers=tuple(d["layers"]), alphas=tuple(float(a) for a in d["alphas"]),
                sizes=tuple(int(s) for s in d["sizes"]), base_ppl=float(d["base_ppl"]),
                t2_values=tuple(d["t2_values"]),
                delta_ppl=tuple(tuple(r) for r in d["delta_ppl"]), mode=d["mode"],
                groups=tuple(d["groups"]), meta=d.get("meta", {}),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is not an alpha table: missing/invalid field {e}") from None

    def check_matches(self, layer_paths: Sequence[str]) -> None:
        """Raises ValueError unless the table covers exactly `layer_paths`, with usable alphas."""
        missing = sorted(set(layer_paths) - set(self.layers))
        extra = sorted(set(self.layers) - set(layer_paths))
        if missing or extra:
            raise ValueError(
                f"alpha table does not match the model's layers: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, extra {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        for name, a in zip(self.layers, self.alphas):
            if not np.isfinite(a) or a < 0:
                raise ValueError(f"alpha of layer {name!r} is {a}; alphas must be finite and >= 0")


def fit_alpha(t2: np.ndarray, dppl: np.ndarray) -> float:
    """Least squares through the origin: argmin_a sum (dppl - a t2)^2 = <t2, dppl> / <t2, t2>."""
    t2, dppl = np.asarray(t2, float), np.asarray(dppl, float)
    if not (np.all(np.isfinite(t2)) and np.all(np.isfinite(dppl))):
        raise ValueError(f"non-finite calibration points t2={t2}, dPPL={dppl}")
    return float(np.dot(t2, dppl) / np.dot(t2, t2))


def _block_of(path: str) -> str:
    m = re.match(r"^(.*?layers_\d+)(/|$)", path)
    return m.group(1) if m else path


def calibrate_alphas(
    params: Any,
    ppl_fn: Callable[[Any], float],
    *,
    rules=DEFAULT_RULES,
    t2_values: Sequence[float] = DEFAULT_T2,
    mode: str = "layer",
    seed: int = 0,
    clip_negative: bool = True,
    progress: bool = True,
) -> AlphaTable:
    """Measures alpha for every layer the rules would quantize.

    Args:
      params: fp params tree.
      ppl_fn: params -> perplexity on calibration text (jit it; the tree structure never changes).
      rules: which layers are calibrated (those the rules quantize).
      t2_values: relative noise powers, all in the linear regime (<= 1/16).
      mode: "layer" (one layer at a time) or "block" (one transformer block at a time).
      seed: noise seed; each (unit, t^2) gets fold_in(seed, ...) noise.
      clip_negative: noisy measurements can give a slightly negative alpha for insensitive
        layers; clip them to 0 (recorded in meta) instead of failing later in the solver.
    """
    if mode not in ("layer", "block"):
        raise ValueError(f"mode must be 'layer' or 'block', got {mode!r}")
    t2_values = tuple(float(t) for t in t2_values)
    if not t2_values or any(not (0 < t <= 1 / 16) for t in t2_values):
        raise ValueError(f"t2_values must be in (0, 1/16] (linear regime), got {t2_values}")
    plan = plan_quantization(params, rules)
    layers = [p for p, lp in plan.items() if lp.spec is not None]
    if not layers:
        raise ValueError("the rules select no layer to calibrate")
    sizes = {p: plan[p].numel for p in layers}
    units = layers if mode == "layer" else sorted({_block_of(p) for p in layers},
                                                  key=lambda b: layers.index(next(q for q in layers if _block_of(q) == b)))
    members = {u: [p for p in layers if (p == u if mode == "layer" else _block_of(p) == u)] for u in units}

    leaves_with_path = jax.tree_util.tree_leaves_with_path(params)
    from higgs_jax.params import path_str

    by_path = {path_str(k): v for k, v in leaves_with_path}
    treedef = jax.tree_util.tree_structure(params)
    order = [path_str(k) for k, _ in leaves_with_path]

    t0 = time.perf_counter()
    base = float(ppl_fn(params))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units) * len(t2_values), desc=f"alpha ({mode})", unit="eval")
    key = jax.random.key(seed)
    dppl_rows, alpha_units = [], {}
    for ui, u in enumerate(units):
        row = []
        for ti, t2 in enumerate(t2_values):
            new = dict(by_path)
            for li, p in enumerate(members[u]):
                w = by_path[p]
                k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, ui), ti), li)
                scale = jnp.sqrt(t2) * jnp.linalg.norm(w.astype(jnp.float32)) / np.sqrt(w.size)
                new[p] = (w + scale * jax.random.normal(k, w.shape, jnp.float32)).astype(w.dtype)
            tree = jax.tree_util.tree_unflatten(treedef, [new[p] for p in order])
            row.append(float(ppl_fn(tree)) - base)
            if bar is not None:
                bar.update(1)
        dppl_rows.append(tuple(row))
        alpha_units[u] = fit_alpha(np.asarray(t2_values), np.asarray(row))
    if bar is not None:
        bar.close()

    clipped = []
    alphas = []
    for p in layers:
        u = p if mode == "layer" else _block_of(p)
        a = alpha_units[u]
        if mode == "block":
            a *= sizes[p] / sum(sizes[q] for q in members[u])
        if a < 0 and clip_negative:
            clipped.append(p)
            a = 0.0
        alphas.append(a)
    return AlphaTable(
        layers=tuple(layers), alphas=tuple(alphas), sizes=tuple(sizes[p] for p in layers),
        base_ppl=base, t2_values=t2_values, delta_ppl=tuple(dppl_rows), mode=mode,
        groups=tuple(units),
        meta={"seconds": time.perf_counter() - t0, "seed": seed, "clipped_to_zero": clipped},
    )
