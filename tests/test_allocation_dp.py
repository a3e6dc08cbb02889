"""DP allocation solver: exactness against brute force, feasibility, monotonicity, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from higgs_jax.allocation.dp import (
    AllocationProblem,
    brute_force,
    discretize,
    exact_solve,
    solve,
)

SEEDS = range(40)
TOL = 1e-9


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(a), abs(b))


def random_problem(
    seed: int,
    *,
    max_layers: int = 6,
    max_options: int = 4,
    integer_bits: bool = False,
    unit_sizes: bool = False,
    with_unavailable: bool = True,
) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, max_layers + 1))
    J = int(rng.integers(1, max_options + 1))
    if integer_bits:
        bits = rng.integers(1, 9, size=(L, J)).astype(float)
    else:
        bits = rng.uniform(1.0, 8.0, size=(L, J))
    # Errors roughly decreasing in bits (like grids), with noise so the trade-off is non-trivial.
    errors = np.exp(-1.3 * bits) * rng.uniform(0.5, 2.0, size=(L, J))
    alphas = rng.uniform(0.0, 10.0, size=L)
    alphas[rng.random(L) < 0.15] = 0.0
    if with_unavailable:
        missing = rng.random((L, J)) < 0.2
        missing[np.arange(L), rng.integers(0, J, size=L)] = False  # keep >= 1 option per layer
        errors = np.where(missing, np.inf, errors)
        bits = np.where(missing, np.nan, bits)  # ignored where unavailable
    sizes = np.ones(L, int) if unit_sizes else rng.integers(1, 1000, size=L)
    return AllocationProblem(alphas=alphas, errors=errors, bits=bits, sizes=sizes)


def random_budget(problem: AllocationProblem, seed: int) -> float:
    lo, hi = problem.feasible_range()
    return lo + (hi - lo) * float(np.random.default_rng(seed + 1000).uniform(0.0, 1.0))


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_solve_equals_brute_force(seed):
    p = random_problem(seed)
    rng = np.random.default_rng(seed + 7)
    costs = rng.integers(0, 12, size=(p.num_layers, p.num_options))
    avail = np.isfinite(p.errors)
    cheapest = int(np.where(avail, costs, 10**9).min(axis=1).sum())
    priciest = int(np.where(avail, costs, -1).max(axis=1).sum())
    capacity = int(rng.integers(cheapest, priciest + 1))
    dp = exact_solve(p, costs, capacity)
    bf = brute_force(p, costs=costs, capacity=capacity)
    assert _close(dp.predicted, bf.predicted), (dp.predicted, bf.predicted)
    assert costs[np.arange(p.num_layers), dp.choices].sum() <= capacity
    assert np.all(avail[np.arange(p.num_layers), dp.choices])


@pytest.mark.parametrize("seed", SEEDS)
def test_dp_exact_when_costs_are_bin_multiples(seed):
    # Unit sizes and integer bits: with num_bins = slack in bits every cost is a whole bin,
    # so the discretised DP (no refinement) must equal brute force in real bits.
    p = random_problem(seed, integer_bits=True, unit_sizes=True)
    lo, hi = p.feasible_range()
    L = p.num_layers
    if round(hi * L) == round(lo * L):
        pytest.skip("a single plan cost: covered by test_budget_at_min")
    total = int(np.random.default_rng(seed + 3).integers(round(lo * L) + 1, round(hi * L) + 1))
    budget = total / L
    slack = total - round(lo * L)
    plan = solve(p, budget, num_bins=slack, refine=False)
    bf = brute_force(p, budget)
    assert _close(plan.predicted, bf.predicted), (plan.predicted, bf.predicted, plan.method)
    assert plan.avg_bits <= budget + 1e-12


@pytest.mark.parametrize("num_bins", [3, 10, 2000])
@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_real_bits_feasible_and_optimal_for_discretisation(seed, refine, num_bins):
    p = random_problem(seed)
    budget = random_budget(p, seed)
    plan = solve(p, budget, num_bins=num_bins, refine=refine)
    # Always feasible in real bits, never better than the true optimum.
    assert plan.avg_bits <= budget * (1 + 1e-12)
    assert plan.avg_bits == pytest.approx(p.average_bits(plan.choices))
    assert plan.predicted >= brute_force(p, budget).predicted - TOL
    if plan.method == "unconstrained":
        return
    # No worse than the best plan that fits in the (rounded-up) bins.
    costs, capacity = discretize(p, budget, num_bins)
    in_bins = brute_force(p, costs=costs, capacity=capacity)
    assert plan.predicted <= in_bins.predicted + TOL * max(1.0, in_bins.predicted)
    # Rounding loses at most one bin per layer: DP <= OPT(budget - L * bin width).
    lo, _ = p.feasible_range()
    reduced = budget - p.num_layers * (budget - lo) / num_bins
    if reduced >= lo:
        assert plan.predicted <= brute_force(p, reduced).predicted + TOL


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("seed", range(8))
def test_objective_non_increasing_in_budget(seed):
    p = random_problem(seed, max_layers=40, max_options=8)
    lo, hi = p.feasible_range()
    budgets = np.linspace(lo, hi, 15)
    values = [solve(p, b, num_bins=500, refine=False).predicted for b in budgets]
    assert all(b <= a + TOL * max(1.0, a) for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("seed", range(8))
def test_exact_objective_non_increasing_in_capacity(seed):
    p = random_problem(seed, max_layers=40, max_options=8)
    costs = np.random.default_rng(seed).integers(0, 50, size=(p.num_layers, p.num_options))
    cheapest = int(np.where(np.isfinite(p.errors), costs, 10**9).min(axis=1).sum())
    values = [exact_solve(p, costs, cheapest + k * 40).predicted for k in range(12)]
    assert all(b <= a + TOL * max(1.0, a) for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("seed", range(10))
def test_budget_at_max_gives_lowest_error_choices(seed):
    p = random_problem(seed, max_layers=30, max_options=6)
    plan = solve(p, p.feasible_range()[1])
    w = p.weighted_errors
    assert plan.predicted == pytest.approx(w.min(axis=1).sum(), rel=1e-12, abs=1e-15)
    assert np.all(w[np.arange(p.num_layers), plan.choices] == w.min(axis=1))


@pytest.mark.parametrize("seed", range(10))
def test_budget_at_min_gives_cheapest_plan(seed):
    p = random_problem(seed)
    lo, _ = p.feasible_range()
    plan = solve(p, lo)
    assert plan.avg_bits == pytest.approx(lo, rel=1e-12)
    assert _close(plan.predicted, brute_force(p, lo).predicted)


def test_large_instance_dp_consistent_and_refinement_helps():
    rng = np.random.default_rng(0)
    L, J = 200, 12
    bits = np.sort(rng.uniform(1.5, 8.0, size=(L, J)), axis=1)
    p = AllocationProblem(
        alphas=rng.uniform(0.1, 5.0, L),
        errors=np.exp(-1.4 * bits) * rng.uniform(0.8, 1.2, (L, J)),
        bits=bits,
        sizes=rng.integers(10**5, 10**7, L),
    )
    raw = solve(p, 3.25, refine=False)
    refined = solve(p, 3.25)
    assert raw.avg_bits <= 3.25 and refined.avg_bits <= 3.25 * (1 + 1e-12)
    assert refined.predicted <= raw.predicted
    # 4x finer bins only relax the rounding (ceil(4x) <= 4 ceil(x)): every plan that fits the
    # coarse bins fits the fine ones, so the fine DP is at least as good.
    fine = solve(p, 3.25, num_bins=8000, refine=False)
    assert fine.predicted <= raw.predicted + TOL


def test_zero_alpha_layer_and_names():
    p = AllocationProblem(
        alphas=[0.0, 1.0],
        errors=[[0.1, 0.01], [0.1, 0.01]],
        bits=[[2.0, 4.0], [2.0, 4.0]],
        sizes=[100, 100],
        layer_names=("a", "b"),
        option_names=("2b", "4b"),
    )
    plan = solve(p, 3.0)
    # The budget allows one 4-bit layer; it must go to the layer whose error counts.
    assert tuple(plan.choices) == (0, 1)
    assert plan.choice_names == ("2b", "4b")
    assert plan.predicted == pytest.approx(0.01)
    assert "b" in plan.describe()


# ---------------------------------------------------------------- bad input


def _valid(**over):
    kw = {
        "alphas": [1.0, 2.0, 3.0],
        "errors": np.full((3, 2), 0.1),
        "bits": np.full((3, 2), 4.0),
        "sizes": [10, 20, 30],
    }
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "alphas, match",
    [
        ([1.0, float("nan"), 3.0], r"layer 1.*nan"),
        ([1.0, 2.0, -0.5], r"layer 2.*-0\.5"),
        ([1.0, float("inf"), 3.0], r"layer 1.*inf"),
    ],
)
def test_bad_alpha_names_layer_and_value(alphas, match):
    with pytest.raises(ValueError, match=match):
        AllocationProblem(**_valid(alphas=alphas))


@pytest.mark.parametrize(
    "over, match",
    [
        ({"errors": np.full((2, 2), 0.1)}, "errors must have shape"),
        ({"bits": np.full((3, 3), 4.0)}, "bits must have the shape"),
        ({"sizes": [10, 20]}, "sizes must have shape"),
        ({"sizes": [10, 0, 30]}, "size of layer 1"),
        ({"errors": [[0.1, np.nan], [0.1, 0.1], [0.1, 0.1]]}, "option 1 at layer 0"),
        ({"errors": [[0.1, 0.1], [-1.0, 0.1], [0.1, 0.1]]}, "option 0 at layer 1"),
        ({"errors": [[0.1, 0.1], [np.inf, np.inf], [0.1, 0.1]]}, "layer 1 has no available"),
        ({"bits": [[4.0, 4.0], [4.0, 4.0], [np.nan, 4.0]]}, "option 0 at layer 2"),
        ({"layer_names": ("a", "b")}, "layer_names has 2"),
        ({"option_names": ("x",)}, "option_names has 1"),
    ],
)
def test_bad_problem_shapes_and_values(over, match):
    with pytest.raises(ValueError, match=match):
        AllocationProblem(**_valid(**over))


@pytest.mark.parametrize(
    "budget, match",
    [
        (1.5, r"budget 1\.5 .*below the cheapest plan \(2\)"),
        (9.25, r"budget 9\.25 .*above the most expensive plan \(8\)"),
        (float("nan"), "budget must be a finite"),
    ],
)
def test_budget_out_of_range(budget, match):
    p = AllocationProblem(**_valid(bits=np.array([[2.0, 8.0]] * 3)))
    with pytest.raises(ValueError, match=match):
        solve(p, budget)


def test_bad_num_bins_and_exact_inputs():
    p = AllocationProblem(
        **_valid(bits=np.array([[2.0, 8.0]] * 3), errors=np.array([[0.2, 0.01]] * 3))
    )
    with pytest.raises(ValueError, match="num_bins"):
        solve(p, 4.0, num_bins=0)
    with pytest.raises(ValueError, match="capacity 1 is below the cheapest plan's cost 3"):
        exact_solve(p, np.ones((3, 2), int), 1)
    with pytest.raises(ValueError, match="non-negative integers"):
        exact_solve(p, np.full((3, 2), 0.5), 3)
