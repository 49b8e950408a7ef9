"""Layer-level allocation (paper section 3.2, eq. 3-6, and Appendix A.1 baselines).

Every check compares against a reference written here (brute-force enumeration of all K vectors, or a plain
re-derivation of the schedule's constraints), never against the code under test.
"""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import alloc_moe
from alloc_moe import (
    AllocMoeError,
    alloc_l,
    ascending,
    descending,
    lexi,
    normalize_sensitivity,
    uniform,
)
from alloc_moe.core.layer_alloc import LAYER_METHODS, allocate_layers

PAPER_SETTINGS = [  # (L, K_orig, budgets) of DeepSeek-V2-Lite, Qwen1.5-MoE, OLMoE (section 4.1, Table 1)
    (26, 6, (130, 104, 78, 52)),
    (24, 4, (84, 72, 60, 48)),
    (16, 8, (112, 96, 80, 64)),
]
PAPER_CASES = [(L, K, B) for L, K, bs in PAPER_SETTINGS for B in bs]


# ---------------------------------------------------------------- references

def all_vectors(L: int, K: int) -> np.ndarray:
    """Every K vector with 1 <= K_i <= K, shape [K**L, L]."""
    return np.array(list(itertools.product(range(1, K + 1), repeat=L)), dtype=np.int64).reshape(-1, L)


def brute_force(S: np.ndarray, budget: float):
    """Exhaustive eq. 3-5: (optimal cost, all feasible vectors, their costs)."""
    L, K = S.shape
    V = all_vectors(L, K)
    V = V[V.sum(axis=1) <= math.floor(budget)]
    costs = S[np.arange(L)[None, :], V - 1].sum(axis=1)
    return costs.min(), V, costs


def cost_of(S: np.ndarray, ks) -> float:
    return float(sum(S[i, k - 1] for i, k in enumerate(ks)))


def simple_dp_cost(S: np.ndarray, B: int) -> float:
    """A second, plain-Python exact solver (for shapes too big to enumerate): best cost over totals <= B."""
    L, K = S.shape
    best = {0: 0.0}
    for i in range(L):
        nxt = {}
        for b, c in best.items():
            for k in range(1, K + 1):
                if b + k <= B:
                    v = c + S[i, k - 1]
                    if v < nxt.get(b + k, math.inf):
                        nxt[b + k] = v
        best = nxt
    return min(best.values())


def check_bounds(ks, L, K, B):
    assert len(ks) == L
    assert all(isinstance(k, int) for k in ks)
    assert all(1 <= k <= K for k in ks), ks
    assert sum(ks) <= math.floor(B), (ks, B)


def max_ramp_sum(L: int, K: int, first: int) -> int:
    """Largest sum of a non-decreasing, step <= 1 sequence of length L starting at `first`, capped at K."""
    return sum(min(first + i, K) for i in range(L))


def check_ascending_shape(ks, L, K, B):
    assert len(ks) == L
    assert sum(ks) == math.floor(B + 1e-9), (ks, B)
    assert all(1 <= k <= K for k in ks), ks
    for a, b in zip(ks, ks[1:]):
        assert 0 <= b - a <= 1, ks


# ---------------------------------------------------------------- alloc_l: exact optimum

@pytest.mark.parametrize("L,K", [(1, 1), (1, 4), (2, 3), (3, 2), (3, 4), (4, 3), (5, 2), (5, 4)])
def test_alloc_l_matches_brute_force_on_every_budget(L, K):
    rng = np.random.default_rng(1000 * L + K)
    for trial in range(3):
        S = rng.random((L, K)) * rng.choice([1.0, 10.0, 1e3])
        if trial == 1:  # the usual shape: cost falls as k grows
            S = np.sort(S, axis=1)[:, ::-1].copy()
        for B in range(L, L * K + 1):
            ks = alloc_l(S, B)
            check_bounds(ks, L, K, B)
            best, _, _ = brute_force(S, B)
            assert abs(cost_of(S, ks) - best) <= 1e-12 * max(1.0, abs(best)), (S, B, ks)


def test_alloc_l_fractional_budget_spends_only_floor():
    rng = np.random.default_rng(7)
    S = -np.cumsum(rng.random((4, 3)) + 0.1, axis=1)  # strictly falling costs: every extra activation helps
    for B in (4.5, 7.25, 9.999, 11.9):
        ks = alloc_l(S, B)
        check_bounds(ks, 4, 3, B)
        best, _, _ = brute_force(S, B)
        assert abs(cost_of(S, ks) - best) <= 1e-12
        assert sum(ks) == math.floor(B)


@pytest.mark.parametrize("L,K", [(3, 3), (4, 3), (5, 2), (4, 4), (5, 3)])
def test_alloc_l_tie_break_toward_uniform(L, K):
    """With integer costs many vectors tie; among the optimal ones the DP must minimise sum (K_i - B/L)^2."""
    rng = np.random.default_rng(31 * L + K)
    n_ties_seen = 0
    for trial in range(6):
        S = rng.integers(0, 3, size=(L, K)).astype(np.float64)
        if trial == 0:
            S[:] = 0.0  # everything ties
        for B in range(L, L * K + 1):
            ks = alloc_l(S, B)
            check_bounds(ks, L, K, B)
            best, V, costs = brute_force(S, B)
            opt = V[costs == best]
            n_ties_seen += len(opt) > 1
            secondary = ((opt - B / L) ** 2).sum(axis=1)
            got = cost_of(S, ks)
            assert got == best, (S, B, ks)
            got_secondary = sum((k - B / L) ** 2 for k in ks)
            assert got_secondary <= secondary.min() + 1e-9, (S.tolist(), B, ks, opt[secondary.argmin()].tolist())
    assert n_ties_seen > 10  # the test really exercised ties


def test_alloc_l_all_zero_costs_gives_uniform_shape():
    # every vector ties on cost; the closest to B/L per layer is floor/ceil of B/L in every layer
    for L, K, B in [(4, 4, 10), (26, 6, 104), (24, 4, 84), (16, 8, 112), (5, 3, 5), (5, 3, 15)]:
        ks = alloc_l(np.zeros((L, K)), B)
        assert sum(ks) <= B and max(ks) - min(ks) <= 1, ks
        assert all(math.floor(B / L) <= k <= math.ceil(B / L) for k in ks), ks
        if B % L == 0:
            assert ks == [B // L] * L


def test_alloc_l_deterministic():
    rng = np.random.default_rng(3)
    S = rng.integers(0, 2, size=(12, 6)).astype(float)
    for B in (12, 30, 50, 72):
        assert alloc_l(S, B) == alloc_l(S.copy(), B) == alloc_l(S.tolist(), B)


@pytest.mark.parametrize("L,K,B", PAPER_CASES + [(61, 8, 488), (61, 8, 200)])
def test_alloc_l_paper_sizes_optimal(L, K, B):
    rng = np.random.default_rng(L * K + B)
    S = np.sort(rng.random((L, K)) * 5, axis=1)[:, ::-1].copy()
    ks = alloc_l(S, B)
    check_bounds(ks, L, K, B)
    if L * K <= 220:
        assert abs(cost_of(S, ks) - simple_dp_cost(S, B)) <= 1e-9


def milp_cost(S: np.ndarray, B: int) -> float:
    """An exact reference independent of any DP: eq. 3-5 as a 0/1 integer program solved by branch and bound
    (scipy's HiGHS, relative gap 0). x[i, k] = 1 iff layer i keeps k + 1 experts; one k per layer; sum of K_i <= B."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, kron

    L, K = S.shape
    one_per_layer = kron(np.eye(L), np.ones((1, K)), format="csr")
    budget = csr_array(np.tile(np.arange(1, K + 1, dtype=float), L)[None, :])
    res = milp(S.ravel(), integrality=np.ones(L * K), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_per_layer, 1, 1), LinearConstraint(budget, -np.inf, B)],
               options={"mip_rel_gap": 0.0, "presolve": True})
    assert res.success, res.message
    x = res.x.reshape(L, K).round().astype(int)
    assert (x.sum(axis=1) == 1).all() and int((x.argmax(axis=1) + 1).sum()) <= B  # a real, feasible vector
    return cost_of(S, list(x.argmax(axis=1) + 1))


@pytest.mark.parametrize("L,K", [(26, 6), (24, 4), (16, 8)])
def test_alloc_l_paper_largest_sizes_match_an_integer_program(L, K):
    """The paper's three models at every one of their budgets, at the extremes (B = L: one expert per layer;
    B = L * K: no constraint), and at budgets in between, on three kinds of cost matrix: falling in k (the usual
    shape), unstructured, and small integers (many ties, where only the cost has to match). The DP's cost equals the
    integer program's optimum."""
    pytest.importorskip("scipy", reason="the integer-program reference needs scipy")
    budgets = sorted({B for l_, k_, bs in PAPER_SETTINGS if (l_, k_) == (L, K) for B in bs}
                     | {L, L + 1, (L * K) // 3, L * K - 1, L * K})
    rng = np.random.default_rng(L * 100 + K)
    for kind in ("falling", "random", "ties"):
        if kind == "falling":
            S = np.sort(rng.random((L, K)) * 5, axis=1)[:, ::-1].copy()
        elif kind == "random":
            S = rng.normal(size=(L, K)) * 3
        else:
            S = rng.integers(0, 4, size=(L, K)).astype(np.float64)
        for B in budgets:
            ks = alloc_l(S, B)
            check_bounds(ks, L, K, B)
            ref = milp_cost(S, B)
            assert abs(cost_of(S, ks) - ref) <= 1e-9 * max(1.0, abs(ref)), (kind, B, ks)
            if kind == "ties":
                assert cost_of(S, ks) == ref  # integer costs: exactly


def test_alloc_l_does_not_modify_input():
    S = np.array([[3.0, 2.0, 1.0], [5.0, 1.0, 0.5]])
    before = S.copy()
    alloc_l(S, 4)
    assert np.array_equal(S, before)


@st.composite
def small_instances(draw, integer_costs=False):
    L = draw(st.integers(1, 5))
    K = draw(st.integers(1, 4))
    if integer_costs:
        vals = st.integers(-3, 3).map(float)
    else:
        vals = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    S = np.array(draw(st.lists(st.lists(vals, min_size=K, max_size=K), min_size=L, max_size=L)), dtype=np.float64)
    B = draw(st.integers(L, L * K))
    return S, B


@settings(max_examples=120, deadline=None)
@given(small_instances())
def test_alloc_l_property_optimal_and_feasible(inst):
    S, B = inst
    ks = alloc_l(S, B)
    L, K = S.shape
    check_bounds(ks, L, K, B)
    best, _, _ = brute_force(S, B)
    assert abs(cost_of(S, ks) - best) <= 1e-9 * max(1.0, np.abs(S).sum())


@settings(max_examples=60, deadline=None)
@given(small_instances(integer_costs=True))
def test_alloc_l_property_ties(inst):
    S, B = inst
    ks = alloc_l(S, B)
    best, V, costs = brute_force(S, B)
    assert cost_of(S, ks) == best
    opt = V[costs == best]
    assert sum((k - B / len(ks)) ** 2 for k in ks) <= ((opt - B / len(ks)) ** 2).sum(axis=1).min() + 1e-9


@settings(max_examples=60, deadline=None)
@given(small_instances())
def test_alloc_l_property_cost_non_increasing_in_budget(inst):
    S, _ = inst
    L, K = S.shape
    costs = [cost_of(S, alloc_l(S, B)) for B in range(L, L * K + 1)]
    for a, b in zip(costs, costs[1:]):
        assert b <= a + 1e-9 * max(1.0, np.abs(S).sum()), costs


# ---------------------------------------------------------------- alloc_l: bad input

@pytest.mark.parametrize("B", [3, 2.999, 13, 12.5, 0, -4, float("nan"), float("inf"), float("-inf")])
def test_alloc_l_budget_out_of_range_names_the_range(B):
    S = np.ones((4, 3))  # valid budgets: 4..12
    with pytest.raises(AllocMoeError) as e:
        alloc_l(S, B)
    msg = str(e.value)
    assert "4" in msg and "12" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("B", ["abc", None, [4]])
def test_alloc_l_budget_not_a_number(B):
    with pytest.raises(AllocMoeError):
        alloc_l(np.ones((4, 3)), B)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_alloc_l_rejects_non_finite_matrix(bad):
    S = np.ones((3, 3))
    S[1, 2] = bad
    with pytest.raises(AllocMoeError, match="(?i)nan|inf"):
        alloc_l(S, 6)


@pytest.mark.parametrize("S", [np.zeros((0, 3)), np.zeros((3, 0)), np.zeros((0, 0)), np.zeros(4), np.zeros((2, 2, 2)), []])
def test_alloc_l_rejects_empty_or_misshaped(S):
    with pytest.raises(AllocMoeError):
        alloc_l(S, 4)


def test_alloc_l_budget_edges_are_valid():
    S = np.random.default_rng(0).random((4, 3))
    assert alloc_l(S, 4) == [1, 1, 1, 1]
    falling = np.sort(S, axis=1)[:, ::-1].copy()  # cost falls with k: the full budget is optimal
    assert alloc_l(falling, 12) == [3, 3, 3, 3]


# ---------------------------------------------------------------- normalisation

def test_normalize_definitions():
    S = np.array([[30.0, 20.0, 10.0], [8.0, 6.0, 4.0]])
    assert np.array_equal(normalize_sensitivity(S, "none"), S)
    rel = np.array([[2.0, 1.0, 0.0], [1.0, 0.5, 0.0]])
    np.testing.assert_allclose(normalize_sensitivity(S, "relative"), rel, rtol=0, atol=1e-15)
    log = np.array([[math.log(3), math.log(2), 0.0], [math.log(2), math.log(1.5), 0.0]])
    np.testing.assert_allclose(normalize_sensitivity(S, "log"), log, rtol=0, atol=1e-15)


def test_normalize_default_is_relative_and_input_untouched():
    S = np.array([[30.0, 20.0, 10.0], [8.0, 6.0, 4.0]])
    before = S.copy()
    np.testing.assert_array_equal(normalize_sensitivity(S), normalize_sensitivity(S, "relative"))
    out = normalize_sensitivity(S, "none")
    out[0, 0] = -1
    assert np.array_equal(S, before)  # "none" returns a copy


def test_normalize_errors():
    with pytest.raises(AllocMoeError, match="unknown"):
        normalize_sensitivity(np.ones((2, 2)), "zscore")
    with pytest.raises(AllocMoeError):
        normalize_sensitivity(np.array([[1.0, 0.0]]), "relative")
    with pytest.raises(AllocMoeError):
        normalize_sensitivity(np.array([[1.0, -2.0]]), "log")
    with pytest.raises(AllocMoeError):
        normalize_sensitivity(np.array([[0.0, 2.0]]), "log")


@settings(max_examples=60, deadline=None)
@given(small_instances(), st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=5, max_size=5))
def test_row_shift_does_not_change_optimum(inst, shifts):
    S, B = inst
    c = np.array(shifts[: S.shape[0]])[:, None]
    best, _, _ = brute_force(S, B)
    ks = alloc_l(normalize_sensitivity(S + c, "none"), B)
    assert abs(cost_of(S, ks) - best) <= 1e-9 * max(1.0, np.abs(S).sum() + np.abs(c).sum() * S.shape[1])


def test_relative_can_change_optimum_vs_none():
    # layer 0: ppl 20 at k=1, 10 at k=2 (+10 absolute, +100 % relative)
    # layer 1: ppl 120 at k=1, 100 at k=2 (+20 absolute, +20 % relative); budget 3 -> exactly one layer gets k=1
    S = np.array([[20.0, 10.0], [120.0, 100.0]])
    assert alloc_l(normalize_sensitivity(S, "none"), 3) == [1, 2]  # cheaper in absolute ppl: shrink layer 0
    assert alloc_l(normalize_sensitivity(S, "relative"), 3) == [2, 1]  # cheaper relatively: shrink layer 1
    assert alloc_l(normalize_sensitivity(S, "log"), 3) == [2, 1]
    # the same through the registered methods
    kw = dict(budget=3, num_layers=2, k_orig=2, sensitivity=S)
    assert LAYER_METHODS["alloc-l"](**kw) == [2, 1]  # default normalisation is relative
    assert LAYER_METHODS["alloc-l"](**kw, normalization="none") == [1, 2]
    assert lexi(**kw) == [1, 2]  # LExI: the matrix as given


# ---------------------------------------------------------------- lexi and the registry

def test_lexi_is_dp_on_raw_matrix():
    rng = np.random.default_rng(11)
    for L, K in [(3, 3), (4, 4), (5, 3)]:
        S = rng.random((L, K)) * rng.random((L, 1)) * 10
        S[:, -1] = 0.0  # LExI deviations are 0 at K_orig: relative normalisation would be undefined
        for B in range(L, L * K + 1):
            ks = lexi(budget=B, num_layers=L, k_orig=K, sensitivity=S)
            check_bounds(ks, L, K, B)
            best, _, _ = brute_force(S, B)
            assert abs(cost_of(S, ks) - best) <= 1e-12


def test_sensitivity_methods_need_matching_matrix():
    for name in ("alloc-l", "lexi"):
        with pytest.raises(AllocMoeError, match="sensitivity"):
            allocate_layers(name, budget=8, num_layers=4, k_orig=3)
        with pytest.raises(AllocMoeError, match="shape"):
            allocate_layers(name, budget=8, num_layers=4, k_orig=3, sensitivity=np.ones((3, 3)))


def test_registry():
    assert set(LAYER_METHODS) == {"alloc-l", "uniform", "ascending", "descending", "lexi"}
    with pytest.raises(AllocMoeError) as e:
        allocate_layers("greedy", budget=8, num_layers=4, k_orig=3)
    assert "greedy" in str(e.value) and "uniform" in str(e.value)
    for name in ("uniform", "ascending", "descending"):
        assert sum(allocate_layers(name, budget=8, num_layers=4, k_orig=3)) == 8


def test_package_exports():
    for name in ("alloc_l", "uniform", "ascending", "descending", "lexi", "normalize_sensitivity", "AllocMoeError"):
        assert hasattr(alloc_moe, name)
    assert issubclass(AllocMoeError, ValueError)


# ---------------------------------------------------------------- uniform / ascending / descending

def check_uniform(L, K, B):
    u = uniform(budget=B, num_layers=L, k_orig=K)
    assert len(u) == L and all(isinstance(x, int) for x in u)
    assert sum(u) == math.floor(B + 1e-9)
    assert max(u) - min(u) <= 1
    assert all(1 <= x <= K for x in u)
    f = uniform(budget=B, num_layers=L, k_orig=K, integer=False)
    assert len(f) == L and all(abs(x - B / L) <= 1e-12 for x in f)


def check_schedules(L, K, B):
    a = ascending(budget=B, num_layers=L, k_orig=K)
    d = descending(budget=B, num_layers=L, k_orig=K)
    check_ascending_shape(a, L, K, B)
    assert d == a[::-1]
    # first layer: K_min = 1 unless the budget cannot be reached from 1, then the smallest K_min that reaches it
    Bi = math.floor(B + 1e-9)
    k_min = next(k for k in range(1, K + 1) if max_ramp_sum(L, K, k) >= Bi)
    assert a[0] == k_min, (L, K, B, a)


@pytest.mark.parametrize("L,K,B", PAPER_CASES)
def test_schedules_paper_settings(L, K, B):
    check_uniform(L, K, B)
    check_schedules(L, K, B)
    a = ascending(budget=B, num_layers=L, k_orig=K)
    assert a[-1] == K  # every paper budget leaves room to reach K_max = K_orig at the deepest layer


def test_ascending_olmoe_112_raises_k_min():
    L, K, B = 16, 8, 112
    assert max_ramp_sum(L, K, 1) == 100 < B  # from K_min=1 the budget is out of reach ...
    assert max_ramp_sum(L, K, 2) == 107 < B
    assert max_ramp_sum(L, K, 3) == 113 >= B  # ... K_min=3 is the first that fits
    a = ascending(budget=B, num_layers=L, k_orig=K)
    assert a[0] == 3 and a[-1] == 8 and sum(a) == 112
    assert descending(budget=B, num_layers=L, k_orig=K)[-1] == 3


def test_ascending_paper_settings_start_at_one_where_possible():
    for L, K, B in PAPER_CASES:
        if max_ramp_sum(L, K, 1) >= B:
            assert ascending(budget=B, num_layers=L, k_orig=K)[0] == 1


def test_schedules_exhaustive_small():
    for L in range(1, 13):
        for K in range(1, 9):
            for B in range(L, L * K + 1):
                check_uniform(L, K, B)
                check_schedules(L, K, B)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_schedules_property(data):
    L = data.draw(st.integers(1, 40))
    K = data.draw(st.integers(1, 8))
    B = data.draw(st.one_of(st.integers(L, L * K), st.floats(L, L * K, allow_nan=False)))
    check_uniform(L, K, B)
    check_schedules(L, K, B)


def test_uniform_fractional_qwen():
    f = uniform(budget=84, num_layers=24, k_orig=4, integer=False)
    assert f == [3.5] * 24
    u = uniform(budget=84, num_layers=24, k_orig=4)
    assert sorted(u) == [3] * 12 + [4] * 12


@pytest.mark.parametrize("fn", [uniform, ascending, descending])
@pytest.mark.parametrize("B", [25, 157, float("nan"), float("inf"), -1])
def test_schedules_reject_out_of_range(fn, B):
    with pytest.raises(AllocMoeError) as e:
        fn(budget=B, num_layers=26, k_orig=6)
    assert "26" in str(e.value) and "156" in str(e.value)


@pytest.mark.parametrize("seed", range(20))
def test_alloc_l_exact_budget_spends_floor_b_optimally(seed):
    """exact=True: the optimum among allocations with sum == floor(B), checked by brute force."""
    import itertools

    rng = np.random.default_rng(seed)
    L, K = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    S = rng.normal(size=(L, K))
    for B in range(L, L * K + 1):
        got = alloc_l(S, B, exact=True)
        assert sum(got) == B
        best = min(sum(S[i, k - 1] for i, k in enumerate(ks))
                   for ks in itertools.product(range(1, K + 1), repeat=L) if sum(ks) == B)
        assert sum(S[i, k - 1] for i, k in enumerate(got)) == pytest.approx(best, abs=1e-12)
