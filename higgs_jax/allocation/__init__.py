"""Linearity theorem and dynamic bitwidths: error model, alpha calibration, DP allocation.

`dp` solves the allocation knapsack (min sum_l alpha_l * t_l^2 under an average bits/weight
budget); `calibrate`, `dynamic` and `linearity` build its inputs and check its predictions.
"""

from higgs_jax.allocation.dp import (
    AllocationPlan,
    AllocationProblem,
    brute_force,
    discretize,
    exact_solve,
    solve,
)

__all__ = [
    "AllocationPlan",
    "AllocationProblem",
    "brute_force",
    "discretize",
    "exact_solve",
    "solve",
]
