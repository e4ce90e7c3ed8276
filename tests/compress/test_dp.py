"""L-GreCo's dynamic program vs exhaustive search, and its budget guarantees."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsys24.compress.dp import brute_force, brute_force_real, discretise, solve


@st.composite
def instances(draw):
    L = draw(st.integers(1, 5))
    C = draw(st.integers(1, 4))
    D = draw(st.sampled_from([1, 7, 20, 83, 200]))
    errors = np.array(draw(st.lists(st.floats(0.0, 10.0), min_size=L * C, max_size=L * C))).reshape(L, C)
    sizes = np.array(draw(st.lists(st.integers(1, 1000), min_size=L * C, max_size=L * C)), float).reshape(L, C)
    uniform = [draw(st.integers(0, C - 1)) for _ in range(L)]
    alpha = draw(st.sampled_from([0.5, 1.0, 1.5, 2.0]))
    return errors, sizes, uniform, alpha, D


@settings(max_examples=150, deadline=None)
@given(instances())
def test_dp_equals_brute_force_on_discretised_problem(inst):
    errors, sizes, uniform, alpha, D = inst
    budget = alpha * errors[np.arange(len(uniform)), uniform].sum()
    sol = solve(errors, sizes, budget, D)
    best, _ = brute_force(errors, sizes, budget, D)
    if math.isinf(best):
        assert not sol.feasible
    else:
        assert sol.feasible and sol.total_size == pytest.approx(best)
        q = discretise(errors, budget, D)
        assert q[np.arange(len(sol.choice)), sol.choice].sum() <= D


@settings(max_examples=150, deadline=None)
@given(instances())
def test_budget_holds_in_real_errors_and_dp_is_bounded_by_real_optimum(inst):
    errors, sizes, uniform, alpha, D = inst
    budget = alpha * errors[np.arange(len(uniform)), uniform].sum()
    sol = solve(errors, sizes, budget, D, fallback=uniform if alpha >= 1 else None)
    if sol.feasible:
        real = errors[np.arange(len(sol.choice)), sol.choice].sum()
        assert real <= budget * (1 + 1e-9) + 1e-12
        assert sol.total_error == pytest.approx(real)
        best_real, _ = brute_force_real(errors, sizes, budget)
        assert sol.total_size >= best_real - 1e-9          # discretisation can only cost bytes
    if alpha >= 1:                                         # the uniform setting is always admissible
        assert sol.feasible
        assert sol.total_size <= sizes[np.arange(len(uniform)), uniform].sum() + 1e-9


@settings(max_examples=100, deadline=None)
@given(instances())
def test_card_alpha_keeps_uniform_feasible_without_fallback(inst):
    """alpha = 1 + 2(L+1)/D makes c0 feasible after ceil rounding, so the DP alone never exceeds uniform."""
    errors, sizes, uniform, _, D = inst
    L = len(uniform)
    if D < 2 * L + 2:
        return
    errors = errors + 0.01                                  # strictly positive errors
    alpha = 1 + 2 * (L + 1) / D
    budget = alpha * errors[np.arange(L), uniform].sum()
    sol = solve(errors, sizes, budget, D)
    assert sol.feasible and not sol.fell_back
    assert sol.total_size <= sizes[np.arange(L), uniform].sum() + 1e-9


def test_unavailable_and_bad_candidates_never_chosen():
    errors = np.array([[0.1, np.nan, 0.5], [0.2, 0.3, np.inf]])
    sizes = np.array([[10.0, 1.0, 5.0], [8.0, 4.0, 1.0]])
    sizes[0, 2] = np.inf                                    # padded candidate
    sol = solve(errors, sizes, budget=1.0, buckets=100)
    assert sol.choice[0] == 0 and sol.choice[1] == 1
    assert sol.total_size == 14.0


def test_zero_budget_admits_only_exact_candidates():
    errors = np.array([[0.0, 1.0], [0.0, 2.0]])
    sizes = np.array([[10.0, 1.0], [20.0, 1.0]])
    sol = solve(errors, sizes, 0.0, 50)
    assert sol.choice == [0, 0]
    sol = solve(np.array([[1.0]]), np.array([[1.0]]), 0.0, 50)
    assert not sol.feasible


def test_larger_budget_never_costs_more():
    rng = np.random.default_rng(0)
    errors = rng.uniform(0.1, 1.0, (8, 5))
    sizes = rng.integers(1, 100, (8, 5)).astype(float)
    prev = math.inf
    for budget in [2.0, 3.0, 4.0, 6.0, 10.0]:
        s = solve(errors, sizes, budget, 1000).total_size
        assert s <= prev + 1e-9
        prev = s


def test_solve_is_fast_at_paper_scale():
    import time
    rng = np.random.default_rng(1)
    L, C, D = 100, 9, 10_000
    errors = rng.uniform(0.0, 1.0, (L, C))
    sizes = rng.integers(1, 10_000, (L, C)).astype(float)
    t0 = time.perf_counter()
    sol = solve(errors, sizes, errors[:, 4].sum(), D, fallback=[4] * L)
    assert time.perf_counter() - t0 < 5.0
    assert sol.total_size <= sizes[:, 4].sum()
