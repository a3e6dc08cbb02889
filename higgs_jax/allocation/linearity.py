"""Linearity check: predicted sum_l alpha_l t_l^2 vs measured dPPL for several plans.

Each plan is quantized for real (`quantize_params`), its measured per-layer t^2 feed the
prediction, and the perplexity of the quantized model gives the measured dPPL.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from higgs_jax.params import LayerPlan, quantize_params


@dataclasses.dataclass
class LinearityPoint:
    name: str
    avg_bits: float  # over the calibrated layers, scales included
    predicted: float
    measured: float
    ppl: float
    seconds: float

    @property
    def rel_error(self) -> float:
        return (self.predicted - self.measured) / self.measured if self.measured else float("nan")


def check_linearity(
    params: Any,
    plans: Mapping[str, Mapping[str, LayerPlan]],
    alphas: Mapping[str, float],
    ppl_fn: Callable[[Any], float],
    base_ppl: float,
    *,
    log=print,
) -> list[LinearityPoint]:
    """Quantizes with every plan, measures PPL and compares dPPL with sum alpha_l t_l^2."""
    points = []
    for name, plan in plans.items():
        t0 = time.perf_counter()
        q, report = quantize_params(params, plan=plan)
        pred, bits, size = 0.0, 0.0, 0
        for r in report.layers:
            if r.path in alphas:
                n = int(np.prod(r.shape))
                bits += r.bits_per_weight * n
                size += n
                if r.t2 is not None:
                    pred += alphas[r.path] * r.t2
        ppl = float(ppl_fn(q))
        pt = LinearityPoint(name, bits / size, pred, ppl - base_ppl, ppl, time.perf_counter() - t0)
        points.append(pt)
        log(f"  {name:28s} bits {pt.avg_bits:6.3f}  predicted dPPL {pt.predicted:8.4f}  "
            f"measured {pt.measured:8.4f}  (rel. err {pt.rel_error:+.1%})")
    return points


def format_points(points) -> str:
    head = f"{'plan':28s} {'bits/w':>7s} {'pred dPPL':>10s} {'meas dPPL':>10s} {'rel err':>8s} {'PPL':>9s}"
    rows = [head, "-" * len(head)]
    for p in points:
        rows.append(f"{p.name:28s} {p.avg_bits:7.3f} {p.predicted:10.4f} {p.measured:10.4f} "
                    f"{p.rel_error:+8.1%} {p.ppl:9.4f}")
    return "\n".join(rows)


def plot_linearity(points, path: str | Path, title: str = "linearity theorem") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    pred = np.array([p.predicted for p in points])
    meas = np.array([p.measured for p in points])
    ax.scatter(pred, meas, zorder=3)
    for p in points:
        ax.annotate(p.name, (p.predicted, p.measured), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    pos = np.concatenate([pred, meas])
    pos = pos[pos > 0]
    lo, hi = (pos.min() / 1.5, pos.max() * 1.5) if pos.size else (1e-3, 1)
    ax.plot([lo, hi], [lo, hi], "--", color="gray", label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"predicted $\Delta$PPL = $\sum_l \alpha_l t_l^2$")
    ax.set_ylabel(r"measured $\Delta$PPL")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
