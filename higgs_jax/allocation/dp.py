"""Optimal per-layer bitwidth allocation under the linearity theorem (multiple-choice knapsack).

Glossary: L = number of layers, J = number of options per layer, alpha_l = sensitivity of layer l
(dPPL ~= sum_l alpha_l * t_l^2, SPEC §2), err[l, j] = relative error t^2 of option j at layer l
(+inf = option not available there), bits[l, j] = bits/weight of option j at layer l *including*
scales and padding, size_l = number of weights of layer l, budget = average bits/weight over all
layers, C = capacity in integer cost bins, F[c] = least sum alpha*err of the layers seen so far
with total cost <= c bins.

Problem: choose j_l per layer to minimise sum_l alpha_l * err[l, j_l] subject to
sum_l size_l * bits[l, j_l] <= budget * sum_l size_l.

Dynamic programming (`solve`): F_l[c] = min_j F_{l-1}[c - cost_lj] + alpha_l * err[l, j] with
F_0 = 0, a jitted `lax.scan` over layers (vectorised over c and j), storing argmin_j for every
(l, c); a reversed `lax.scan` backtracks from c = C. O(L * J * C) time, O(L * C) int16 memory.

Discretisation (why the result is always feasible): costs are measured relative to each layer's
cheapest option, extra_lj = size_l * (bits_lj - min_j bits_lj), and the remaining slack
S = budget * sum(size) - sum_l size_l * min_j bits_lj is cut into C = num_bins bins of width
w = S / num_bins. Every extra cost is rounded UP, cost_lj = ceil(extra_lj / w), so a plan that fits
in C bins fits the real budget: the DP never returns an infeasible plan, and the cheapest plan
(cost 0 bins) is always representable. The price of rounding up is at most one bin per layer:
every real plan of cost <= budget*sum(size) - L*w fits in the bins, so
    OPT(budget) <= DP <= OPT(budget - L * S / (num_bins * sum(size)))
When all extra costs are exact multiples of w, the DP is exactly optimal; `exact_solve` takes
user-supplied integer costs and a capacity and is exactly optimal (tested against `brute_force`).
After the DP, `solve` runs a greedy local refinement in real (unrounded) costs that only accepts
single-layer switches that stay within the real budget and lower the objective, recovering some
of the budget lost to rounding; it never makes the plan worse or infeasible.

Shortcuts: if the per-layer lowest-error choice already fits the budget it is returned directly
(it is optimal). Budgets below the cheapest plan or above the most expensive plan raise
`ValueError` naming the budget and the feasible range.

Arithmetic is float64 (`jax.enable_x64` scoped to the solver) so that objective ties and near-ties
are resolved like the float64 brute force.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AllocationPlan",
    "AllocationProblem",
    "brute_force",
    "discretize",
    "exact_solve",
    "solve",
]

# Relative slack used when comparing float budgets (bits are sums of products of floats).
_REL_TOL = 1e-12


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class AllocationProblem:
    """One allocation instance: per-layer sensitivities, per-(layer, option) error and bit cost.

    Attributes:
      alphas: (L,) float, finite and >= 0: sensitivity alpha_l of each layer.
      errors: (L, J) float >= 0: relative error t^2 of option j at layer l; +inf marks an option
        that is not available at that layer. Every layer needs at least one available option.
      bits: (L, J) float: bits/weight of option j at layer l including scales and padding; must be
        finite and >= 0 wherever the option is available (ignored elsewhere).
      sizes: (L,) int > 0: number of weights of each layer.
      layer_names: optional L names (for reports and error messages).
      option_names: optional J names.
    """

    alphas: np.ndarray
    errors: np.ndarray
    bits: np.ndarray
    sizes: np.ndarray
    layer_names: tuple[str, ...] | None = None
    option_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        alphas = np.asarray(self.alphas, dtype=np.float64)
        errors = np.asarray(self.errors, dtype=np.float64)
        bits = np.asarray(self.bits, dtype=np.float64)
        sizes_raw = np.asarray(self.sizes)
        if alphas.ndim != 1:
            raise ValueError(f"alphas must be 1-D (L,), got shape {alphas.shape}")
        L = alphas.shape[0]
        if L == 0:
            raise ValueError("an allocation problem needs at least one layer (alphas is empty)")
        if errors.ndim != 2 or errors.shape[0] != L or errors.shape[1] == 0:
            raise ValueError(f"errors must have shape (L={L}, J>=1), got {errors.shape}")
        J = errors.shape[1]
        if bits.shape != (L, J):
            raise ValueError(f"bits must have the shape of errors {(L, J)}, got {bits.shape}")
        if sizes_raw.shape != (L,):
            raise ValueError(f"sizes must have shape (L={L},), got {sizes_raw.shape}")
        if not np.all(np.isfinite(sizes_raw)) or np.any(sizes_raw != np.round(sizes_raw)):
            raise ValueError(f"sizes must be integers, got {sizes_raw}")
        sizes = sizes_raw.astype(np.int64)

        bad = np.flatnonzero(~np.isfinite(alphas) | (alphas < 0))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"alpha of layer {i}{self._name(i)} is {alphas[i]!r}; alphas must be finite and "
                f">= 0 (clip or recalibrate noisy negative alphas)"
            )
        bad = np.flatnonzero(sizes <= 0)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"size of layer {i}{self._name(i)} is {sizes[i]}; sizes must be > 0")
        bad = np.argwhere(np.isnan(errors) | (errors < 0))
        if bad.size:
            i, j = (int(x) for x in bad[0])
            raise ValueError(
                f"error of option {j} at layer {i}{self._name(i)} is {errors[i, j]!r}; "
                "errors must be >= 0 (use +inf for an unavailable option)"
            )
        available = np.isfinite(errors)
        no_option = np.flatnonzero(~available.any(axis=1))
        if no_option.size:
            i = int(no_option[0])
            raise ValueError(f"layer {i}{self._name(i)} has no available option (all errors inf)")
        bad = np.argwhere(available & ~(np.isfinite(bits) & (bits >= 0)))
        if bad.size:
            i, j = (int(x) for x in bad[0])
            raise ValueError(
                f"bits of option {j} at layer {i}{self._name(i)} is {bits[i, j]!r}; "
                "bits must be finite and >= 0 where the option is available"
            )
        layer_names = None if self.layer_names is None else tuple(str(n) for n in self.layer_names)
        option_names = (
            None if self.option_names is None else tuple(str(n) for n in self.option_names)
        )
        if layer_names is not None and len(layer_names) != L:
            raise ValueError(f"layer_names has {len(layer_names)} entries, expected L={L}")
        if option_names is not None and len(option_names) != J:
            raise ValueError(f"option_names has {len(option_names)} entries, expected J={J}")
        # Unavailable options cost +inf so no code path can pick them.
        bits = np.where(available, bits, np.inf)
        for name, value in (
            ("alphas", alphas),
            ("errors", errors),
            ("bits", bits),
            ("sizes", sizes),
            ("layer_names", layer_names),
            ("option_names", option_names),
        ):
            object.__setattr__(
                self, name, _readonly(value) if isinstance(value, np.ndarray) else value
            )

    def _name(self, i: int) -> str:
        names = self.layer_names
        return f" ({names[i]})" if names is not None and i < len(names) else ""

    @property
    def num_layers(self) -> int:
        return int(self.alphas.shape[0])

    @property
    def num_options(self) -> int:
        return int(self.errors.shape[1])

    @property
    def total_size(self) -> int:
        return int(self.sizes.sum())

    @property
    def weighted_errors(self) -> np.ndarray:
        """(L, J) alpha_l * err[l, j], +inf where the option is unavailable (also when alpha = 0)."""
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(self.errors), self.alphas[:, None] * self.errors, np.inf)

    @property
    def layer_bits(self) -> np.ndarray:
        """(L, J) real cost size_l * bits[l, j] in bits (+inf where unavailable)."""
        return self.sizes[:, None].astype(np.float64) * self.bits

    def feasible_range(self) -> tuple[float, float]:
        """(cheapest, most expensive) average bits/weight over all plans."""
        lb = self.layer_bits
        hi = np.where(np.isfinite(lb), lb, -np.inf).max(axis=1)
        return float(lb.min(axis=1).sum() / self.total_size), float(hi.sum() / self.total_size)

    def objective(self, choices: Sequence[int] | np.ndarray) -> float:
        """sum_l alpha_l * err[l, choices[l]] (the predicted dPPL of a plan)."""
        c = self._check_choices(choices)
        return float(self.weighted_errors[np.arange(self.num_layers), c].sum())

    def average_bits(self, choices: Sequence[int] | np.ndarray) -> float:
        """Exact average bits/weight of a plan (scales and padding included)."""
        c = self._check_choices(choices)
        return float(self.layer_bits[np.arange(self.num_layers), c].sum() / self.total_size)

    def _check_choices(self, choices: Sequence[int] | np.ndarray) -> np.ndarray:
        c = np.asarray(choices)
        if c.shape != (self.num_layers,) or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(
                f"choices must be {self.num_layers} integers, got shape {c.shape} dtype {c.dtype}"
            )
        if np.any((c < 0) | (c >= self.num_options)):
            raise ValueError(f"choices must lie in [0, {self.num_options}), got {c}")
        return c.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class AllocationPlan:
    """A solved allocation.

    Attributes:
      choices: (L,) int option index per layer.
      predicted: sum_l alpha_l * err[l, choices[l]] (predicted dPPL under the linearity theorem).
      avg_bits: exact average bits/weight of the plan, from the real (unrounded) bits.
      budget: the requested budget in bits/weight (None for `exact_solve`).
      method: how the plan was found: "unconstrained" (lowest-error choice fits), "dp",
        "dp+refine" (greedy refinement improved the DP plan), "exact" or "brute_force".
      num_bins: the DP capacity C in bins (None when no DP ran).
      problem: the problem it solves.
    """

    choices: np.ndarray
    predicted: float
    avg_bits: float
    budget: float | None
    method: str
    num_bins: int | None
    problem: AllocationProblem = dataclasses.field(repr=False)

    @property
    def choice_names(self) -> tuple[str, ...]:
        names = self.problem.option_names
        return tuple(names[j] if names is not None else str(j) for j in self.choices)

    def describe(self) -> str:
        """A per-layer table of the plan (layer, option, bits/weight, alpha*err)."""
        p = self.problem
        lines = [
            f"plan ({self.method}): avg {self.avg_bits:.4f} bits/weight"
            + (f" (budget {self.budget:g})" if self.budget is not None else "")
            + f", predicted {self.predicted:.6g}"
        ]
        w = p.weighted_errors
        for l, j in enumerate(self.choices):
            name = p.layer_names[l] if p.layer_names is not None else str(l)
            lines.append(
                f"  {name:40s} {self.choice_names[l]:>24s} {p.bits[l, j]:7.3f} {w[l, j]:.4g}"
            )
        return "\n".join(lines)


def _make_plan(
    problem: AllocationProblem,
    choices: np.ndarray,
    budget: float | None,
    method: str,
    num_bins: int | None,
) -> AllocationPlan:
    choices = _readonly(np.asarray(choices, dtype=np.int64))
    return AllocationPlan(
        choices=choices,
        predicted=problem.objective(choices),
        avg_bits=problem.average_bits(choices),
        budget=budget,
        method=method,
        num_bins=num_bins,
        problem=problem,
    )


def _check_budget(problem: AllocationProblem, budget: float) -> None:
    lo, hi = problem.feasible_range()
    b = float(budget)
    if not np.isfinite(b):
        raise ValueError(f"budget must be a finite number of bits/weight, got {budget!r}")
    if b < lo * (1 - _REL_TOL):
        raise ValueError(
            f"budget {b:g} bits/weight is below the cheapest plan ({lo:.6g}); "
            f"feasible budgets lie in [{lo:.6g}, {hi:.6g}]"
        )
    if b > hi * (1 + _REL_TOL):
        raise ValueError(
            f"budget {b:g} bits/weight is above the most expensive plan ({hi:.6g}); "
            f"feasible budgets lie in [{lo:.6g}, {hi:.6g}]"
        )


def discretize(
    problem: AllocationProblem, budget_bits_per_weight: float, num_bins: int = 2000
) -> tuple[np.ndarray, int]:
    """Integer DP costs (rounded up, relative to each layer's cheapest option) and the capacity.

    Returns:
      (costs, capacity): costs is (L, J) int64 in [0, capacity + 1] (capacity + 1 = never fits,
      used for unavailable options and options that alone exceed the slack); any plan with
      sum_l costs[l, j_l] <= capacity fits the real budget.
    """
    _check_budget(problem, budget_bits_per_weight)
    if int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    num_bins = int(num_bins)
    lb = problem.layer_bits
    base = lb.min(axis=1)
    extra = lb - base[:, None]  # +inf where unavailable
    total = float(budget_bits_per_weight) * problem.total_size
    slack = total - base.sum()
    never = num_bins + 1
    if slack <= _REL_TOL * total:
        # The budget is (within rounding) the cheapest plan: only zero-extra options fit.
        costs = np.where(extra <= _REL_TOL * total, 0, never)
        return costs.astype(np.int64), num_bins
    with np.errstate(invalid="ignore", over="ignore"):
        q = extra / (slack / num_bins)
        # Shave a relative 1e-12 so exact multiples that picked up float noise stay exact.
        q = np.ceil(q * (1 - _REL_TOL))
    costs = np.where(np.isfinite(q) & (q <= num_bins), q, never)
    return np.maximum(costs, 0).astype(np.int64), num_bins


@functools.partial(jax.jit, static_argnames=("table_size",))
def _dp(
    weighted: jax.Array, costs: jax.Array, capacity: jax.Array, *, table_size: int
) -> tuple[jax.Array, jax.Array]:
    """Forward DP + backtrack.

    Args:
      weighted: (L, J) float alpha*err, +inf = unavailable.
      costs: (L, J) int in [0, table_size] (table_size = never fits).
      capacity: int scalar < table_size, where the backtrack starts.
      table_size: static number of cost cells T (F has T entries, c = 0 .. T-1).

    Returns:
      (least objective with total cost <= capacity, choices (L,)).
    """
    t = table_size
    num_options = weighted.shape[1]
    arg_dtype = jnp.int16 if num_options <= np.iinfo(np.int16).max else jnp.int32

    def forward(f_prev, xs):  # f_prev: (T,) least objective with cost <= c
        w, cost = xs  # (J,), (J,)
        # Left-pad with +inf so that c - cost < 0 reads +inf (cost <= T keeps the start >= 0).
        padded = jnp.concatenate([jnp.full((t,), jnp.inf, f_prev.dtype), f_prev])

        # A running min over options (rather than a (J, T) gather + argmin) keeps everything in
        # one fused elementwise loop: ~10x faster on CPU. Strict `<` keeps the first minimiser.
        def option(j, carry):
            best, arg = carry
            cand = jax.lax.dynamic_slice(padded, (t - cost[j],), (t,)) + w[j]
            better = cand < best
            return jnp.where(better, cand, best), jnp.where(better, j.astype(arg_dtype), arg)

        init = (jnp.full((t,), jnp.inf, f_prev.dtype), jnp.zeros((t,), arg_dtype))
        return jax.lax.fori_loop(0, num_options, option, init, unroll=min(num_options, 32))

    f0 = jnp.zeros((t,), weighted.dtype)
    f, arg = jax.lax.scan(forward, f0, (weighted, costs))  # arg: (L, T)

    def backward(c, xs):
        a, cost = xs  # (T,), (J,)
        j = a[c].astype(jnp.int32)
        return c - cost[j], j

    _, choices = jax.lax.scan(backward, capacity.astype(costs.dtype), (arg, costs), reverse=True)
    return f[capacity], choices


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _run_dp(weighted: np.ndarray, costs: np.ndarray, capacity: int) -> tuple[float, np.ndarray]:
    """Pads (L, J, C+1) to buckets so that similar problems share one compilation: extra layers
    have one free zero-error option, extra options never fit, extra cost cells are never read
    by the backtrack (which starts at `capacity`)."""
    L, J = weighted.shape
    lp, jp, t = _round_up(L, 8), _round_up(J, 4), _round_up(capacity + 1, 128)
    w = np.full((lp, jp), np.inf)
    w[:L, :J] = weighted
    w[L:, 0] = 0.0
    c = np.full((lp, jp), t, dtype=np.int64)
    c[:L, :J] = np.minimum(costs, capacity + 1)
    c[L:, 0] = 0
    with jax.enable_x64(True):
        best, choices = _dp(
            jnp.asarray(w, jnp.float64),
            jnp.asarray(c, jnp.int64),
            jnp.asarray(capacity, jnp.int64),
            table_size=t,
        )
        return float(best), np.asarray(choices, dtype=np.int64)[:L]


def _refine(problem: AllocationProblem, choices: np.ndarray, total_bits: float) -> np.ndarray:
    """Greedy single-layer switches in real costs that lower the objective and stay feasible."""
    w, lb = problem.weighted_errors, problem.layer_bits
    rows = np.arange(problem.num_layers)
    choices = choices.copy()
    limit = total_bits * (1 + _REL_TOL)
    while True:
        used = lb[rows, choices].sum()
        gain = w[rows, choices][:, None] - w  # > 0: switching lowers the objective
        extra = lb - lb[rows, choices][:, None]
        ok = (gain > 0) & (used + extra <= limit)
        if not ok.any():
            return choices
        # Best gain per extra bit (free or cheaper switches first), then largest gain.
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(ok, gain / np.maximum(extra, 1e-300), -np.inf)
        ratio = np.where(ok & (extra <= 0), np.inf, ratio)
        best = np.flatnonzero(ratio.ravel() == ratio.max())
        l, j = divmod(
            int(best[np.argmax(np.where(ok, gain, -np.inf).ravel()[best])]), problem.num_options
        )
        choices[l] = j


def solve(
    problem: AllocationProblem,
    budget_bits_per_weight: float,
    *,
    num_bins: int = 2000,
    refine: bool = True,
) -> AllocationPlan:
    """The least-predicted-error plan whose average bits/weight is <= the budget.

    Args:
      problem: the allocation instance.
      budget_bits_per_weight: average bits/weight over all layers, scales and padding included.
      num_bins: DP resolution C of the slack above the cheapest plan (see the module docstring
        for the rounding guarantee: at most L bins of the slack are lost to rounding up).
      refine: run the greedy real-cost refinement after the DP.

    Returns:
      An `AllocationPlan`; its `avg_bits` is always <= the budget (up to 1e-12 relative).

    Raises:
      ValueError: budget outside [cheapest, most expensive] plan (the message names both), or
        num_bins not a positive integer.
    """
    _check_budget(problem, budget_bits_per_weight)
    budget = float(budget_bits_per_weight)
    total_bits = budget * problem.total_size
    w, lb = problem.weighted_errors, problem.layer_bits
    rows = np.arange(problem.num_layers)
    # Lowest error per layer, cheapest among ties: optimal whenever it fits.
    wmin = w.min(axis=1, keepdims=True)
    best = np.argmin(np.where(w == wmin, lb, np.inf), axis=1)
    if lb[rows, best].sum() <= total_bits * (1 + _REL_TOL):
        return _make_plan(problem, best, budget, "unconstrained", None)
    costs, capacity = discretize(problem, budget, num_bins)
    value, choices = _run_dp(w, costs, capacity)
    if not np.isfinite(value):  # cannot happen: the cheapest plan costs 0 bins
        raise RuntimeError(f"DP found no plan within {capacity} bins (internal error)")
    method = "dp"
    if refine:
        refined = _refine(problem, choices, total_bits)
        if not np.array_equal(refined, choices):
            choices, method = refined, "dp+refine"
    return _make_plan(problem, choices, budget, method, capacity)


def exact_solve(problem: AllocationProblem, costs: np.ndarray, capacity: int) -> AllocationPlan:
    """Exactly optimal plan for user-supplied integer costs: min sum alpha*err s.t.
    sum_l costs[l, j_l] <= capacity. `avg_bits` still reports the real bits of the plan.

    Raises:
      ValueError: costs not (L, J) non-negative integers, capacity not a non-negative integer, or
        no plan fits the capacity (the message names the capacity and the cheapest plan's cost).
    """
    costs = np.asarray(costs)
    shape = (problem.num_layers, problem.num_options)
    if costs.shape != shape:
        raise ValueError(f"costs must have shape {shape}, got {costs.shape}")
    if not np.all(np.isfinite(costs)) or np.any(costs != np.round(costs)) or np.any(costs < 0):
        raise ValueError(f"costs must be non-negative integers, got {costs}")
    if int(capacity) != capacity or capacity < 0:
        raise ValueError(f"capacity must be a non-negative integer, got {capacity!r}")
    capacity = int(capacity)
    w = problem.weighted_errors
    costs = costs.astype(np.int64)
    cheapest = int(np.where(np.isfinite(w), costs, np.iinfo(np.int64).max).min(axis=1).sum())
    if cheapest > capacity:
        raise ValueError(f"capacity {capacity} is below the cheapest plan's cost {cheapest}")
    # Shift by each layer's cheapest available cost: the table then spans only the slack.
    base = np.where(np.isfinite(w), costs, np.iinfo(np.int64).max).min(axis=1)
    slack = capacity - int(base.sum())
    rel = np.where(np.isfinite(w), np.minimum(costs - base[:, None], slack + 1), slack + 1)
    value, choices = _run_dp(w, rel, slack)
    if not np.isfinite(value):  # cannot happen after the cheapest-plan check
        raise RuntimeError("DP found no plan (internal error)")
    return _make_plan(problem, choices, None, "exact", capacity)


def brute_force(
    problem: AllocationProblem,
    budget_bits_per_weight: float | None = None,
    *,
    costs: np.ndarray | None = None,
    capacity: int | None = None,
) -> AllocationPlan:
    """Exhaustive search over all J^L plans (tests only; L*log2(J) must stay small).

    With a budget: feasibility in real bits (avg bits <= budget, 1e-12 relative slack). With
    `costs` and `capacity` instead: feasibility is sum costs <= capacity. Ties keep the first plan in
    lexicographic order.
    """
    if (budget_bits_per_weight is None) == (costs is None or capacity is None):
        raise ValueError("pass either budget_bits_per_weight or both costs and capacity")
    L, J = problem.num_layers, problem.num_options
    if J**L > 2_000_000:
        raise ValueError(f"brute force over {J}^{L} plans is too large")
    w = problem.weighted_errors
    if budget_bits_per_weight is not None:
        _check_budget(problem, budget_bits_per_weight)
        cost = problem.layer_bits
        limit = float(budget_bits_per_weight) * problem.total_size * (1 + _REL_TOL)
    else:
        cost = np.asarray(costs, dtype=np.float64)
        limit = float(capacity)
    plans = np.array(list(itertools.product(range(J), repeat=L)), dtype=np.int64)  # (J^L, L)
    rows = np.arange(L)
    obj = w[rows, plans].sum(axis=1)
    feasible = (cost[rows, plans].sum(axis=1) <= limit) & np.isfinite(obj)
    if not feasible.any():
        raise ValueError(f"no plan fits (capacity {capacity})")
    best = int(np.argmin(np.where(feasible, obj, np.inf)))
    return _make_plan(
        problem,
        plans[best],
        None if budget_bits_per_weight is None else float(budget_bits_per_weight),
        "brute_force",
        None,
    )
