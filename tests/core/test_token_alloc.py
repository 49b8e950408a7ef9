"""Token-level allocation (paper section 3.3, eqs. 7-10), the top-p / NAEE baselines (Appendix A.1) and their
threshold calibration.

References are written here: exhaustive search over subsets of the candidate pairs for Alloc-T, per-token sorted
prefixes for top-p, a per-rank comparison for NAEE, and an exchange-argument optimality certificate for sizes too
large to enumerate.
"""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import graph_ops, sync_ops
from hypothesis import given, settings
from hypothesis import strategies as st

from alloc_moe import (
    TOKEN_METHODS,
    AllocMoeError,
    alloc_t,
    calibrate_threshold,
    mask_to_slots,
    naee_mask,
    top_p_mask,
    topk_mask,
)

# ---------------------------------------------------------------- helpers / references

def rand_probs(T, E, seed, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, E, generator=g, dtype=torch.float64) * scale, dim=-1).to(dtype)


def candidates(p: np.ndarray, k_orig: int) -> list[list[int]]:
    """Each token's top-k_orig experts, best first (eq. 7)."""
    return [list(np.argsort(-row, kind="stable")[:k_orig]) for row in p]


def exact_floor(T: int, k_layer: float) -> int:
    return math.floor(Fraction(str(k_layer)) * T)


def brute_alloc_t(p: np.ndarray, k_layer: float, k_base: int, k_orig: int) -> np.ndarray:
    """Exhaustive eqs. 8-10: among all subsets of the candidate pairs C_l with |subset| = floor(T * k_layer) and at
    least k_base pairs per token, the one with the largest total routing score. Returns the [T, E] bool mask."""
    T, E = p.shape
    cand = [(t, e) for t, row in enumerate(candidates(p, k_orig)) for e in row]
    n = exact_floor(T, k_layer)
    best, best_set = -math.inf, None
    for subset in itertools.combinations(range(len(cand)), n):
        counts = [0] * T
        total = 0.0
        for j in subset:
            t, e = cand[j]
            counts[t] += 1
            total += p[t, e]
        if min(counts) >= k_base and total > best:
            best, best_set = total, subset
    mask = np.zeros((T, E), dtype=bool)
    for j in best_set:
        mask[cand[j]] = True
    return mask


def topk_ref(p: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(p.shape, dtype=bool)
    for t, row in enumerate(candidates(p, k)):
        mask[t, row] = True
    return mask


def top_p_ref(p: np.ndarray, thr: float, k_orig: int) -> np.ndarray:
    mask = np.zeros(p.shape, dtype=bool)
    for t, row in enumerate(p):
        order = np.argsort(-row, kind="stable")
        csum, n = 0.0, 0
        for e in order[:k_orig]:
            csum += row[e]
            n += 1
            if csum >= thr:
                break
        mask[t, order[: max(1, n)]] = True
    return mask


def naee_ref(p: np.ndarray, beta: float, k_orig: int) -> np.ndarray:
    mask = np.zeros(p.shape, dtype=bool)
    for t, row in enumerate(p):
        order = np.argsort(-row, kind="stable")[:k_orig]
        mask[t, order[0]] = True
        for e in order[1:]:
            if row[e] >= beta * row[order[0]]:
                mask[t, e] = True
    return mask


def check_alloc_t_invariants(mask: np.ndarray, p: np.ndarray, k_layer, k_base, k_orig, real=None):
    T, E = p.shape
    real = np.ones(T, dtype=bool) if real is None else real
    cand = candidates(p, k_orig)
    assert mask.sum() == exact_floor(int(real.sum()), k_layer)
    for t in range(T):
        chosen = set(np.flatnonzero(mask[t]))
        if not real[t]:
            assert not chosen, "padding token got experts"
            continue
        assert chosen <= set(cand[t]), "selection outside the token's top-k_orig"
        assert set(cand[t][:k_base]) <= chosen, "token lost one of its top-k_base experts"


def check_optimality_certificate(mask: np.ndarray, p: np.ndarray, k_base: int, k_orig: int, real=None):
    """With each token's top-k_base forced, a selection of fixed size is optimal iff no unselected candidate beats
    a selected non-base one (exchange argument)."""
    real = np.ones(p.shape[0], dtype=bool) if real is None else real
    extra_sel, unsel = [], []
    for t, row in enumerate(candidates(p, k_orig)):
        if not real[t]:
            continue
        for r, e in enumerate(row):
            if r < k_base:
                continue
            (extra_sel if mask[t, e] else unsel).append(p[t, e])
    if extra_sel and unsel:
        assert min(extra_sel) >= max(unsel)


# ---------------------------------------------------------------- Alloc-T: exact optimum

def _alloc_t_cases():
    cases = []
    for T in (1, 2, 3, 4):
        for E, k_orig in ((3, 1), (4, 2), (5, 3), (3, 3)):
            for k_base in range(0, k_orig + 1):
                for k_layer in sorted({k_base, k_base + 0.25, k_base + 0.5, 1.5, 2.25, 2.5, float(k_orig)}):
                    if k_base <= k_layer <= k_orig:
                        cases.append((T, E, k_orig, k_base, k_layer))
    return cases


ALLOC_T_CASES = _alloc_t_cases()


@pytest.mark.parametrize("T,E,k_orig,k_base,k_layer", ALLOC_T_CASES,
                         ids=[f"T{c[0]}-E{c[1]}-K{c[2]}-b{c[3]}-k{c[4]}" for c in ALLOC_T_CASES])
def test_alloc_t_matches_brute_force(T, E, k_orig, k_base, k_layer):
    for seed in range(2):
        probs = rand_probs(T, E, seed=hash((T, E, k_orig, k_base, k_layer, seed)) % 2**31)
        p = probs.numpy()
        mask = alloc_t(probs, k_layer, k_base, k_orig)
        assert mask.dtype == torch.bool and mask.shape == (T, E)
        m = mask.numpy()
        check_alloc_t_invariants(m, p, k_layer, k_base, k_orig)
        ref = brute_alloc_t(p, k_layer, k_base, k_orig)
        assert abs(p[m].sum() - p[ref].sum()) <= 1e-12
        assert np.array_equal(m, ref)  # continuous scores: the optimum is unique


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_alloc_t_property_brute_force(data):
    T = data.draw(st.integers(1, 4))
    E = data.draw(st.integers(1, 5))
    k_orig = data.draw(st.integers(1, min(3, E)))
    k_base = data.draw(st.integers(0, k_orig))
    k_layer = data.draw(st.sampled_from([k_base + f for f in (0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3)]).filter(lambda x: x <= k_orig))
    seed = data.draw(st.integers(0, 2**31 - 1))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    probs = rand_probs(T, E, seed, dtype=dtype)
    p = probs.double().numpy()
    m = alloc_t(probs, k_layer, k_base, k_orig).numpy()
    check_alloc_t_invariants(m, p, k_layer, k_base, k_orig)
    ref = brute_alloc_t(p, k_layer, k_base, k_orig)
    assert p[m].sum() >= p[ref].sum() - 1e-6


@pytest.mark.parametrize("T,E,k_orig,k_base,k_layer", [
    (257, 64, 6, 1, 3.0), (256, 64, 6, 1, 2.25), (100, 60, 4, 2, 3.5), (33, 64, 8, 0, 4.1), (64, 16, 6, 3, 3.0),
])
def test_alloc_t_larger_certificate(T, E, k_orig, k_base, k_layer):
    probs = rand_probs(T, E, seed=T * E + k_orig, dtype=torch.float32)
    p = probs.double().numpy()
    m = alloc_t(probs, k_layer, k_base, k_orig).numpy()
    check_alloc_t_invariants(m, p, k_layer, k_base, k_orig)
    check_optimality_certificate(m, p, k_base, k_orig)


@pytest.mark.parametrize("T,k_layer", [(10, 2.3), (100, 2.3), (10, 0.7), (3, 1.1), (1000, 1.001), (7, 2.9999999)])
def test_alloc_t_count_is_exact_floor(T, k_layer):
    probs = rand_probs(T, 8, seed=T)
    m = alloc_t(probs, k_layer, 0, 4)
    assert int(m.sum()) == exact_floor(T, k_layer)


def test_alloc_t_special_cases_are_plain_topk():
    for T, E, k in [(5, 8, 2), (64, 64, 6), (9, 4, 4), (3, 6, 1)]:
        probs = rand_probs(T, E, seed=E + k, dtype=torch.float32)
        ref = topk_ref(probs.double().numpy(), k)
        assert np.array_equal(topk_mask(probs, k).numpy(), ref)
        assert np.array_equal(alloc_t(probs, k, k, k).numpy(), ref)  # k_base == k_layer == k_orig
    for k_base, k_orig in [(1, 6), (2, 6), (2, 4), (3, 8)]:  # integer k_layer == k_base: top-k_base
        probs = rand_probs(50, 64, seed=k_base * 10 + k_orig, dtype=torch.float32)
        ref = topk_ref(probs.double().numpy(), k_base)
        assert np.array_equal(alloc_t(probs, float(k_base), k_base, k_orig).numpy(), ref)


def test_alloc_t_redistributes_toward_flat_tokens():
    # token 0 is confident, token 1 is flat: with one spare activation, the flat token gets it
    probs = torch.tensor([[0.90, 0.05, 0.03, 0.02], [0.30, 0.28, 0.22, 0.20]])
    m = alloc_t(probs, 1.5, 1, 2)
    assert m.tolist() == [[True, False, False, False], [True, True, False, False]]


@pytest.mark.parametrize("k_layer,k_base,k_orig", [(5, 1, 4), (1.5, 2, 4), (2, 5, 4), (2, -1, 4)])
def test_alloc_t_rejects_inconsistent_ks(k_layer, k_base, k_orig):
    with pytest.raises(ValueError):
        alloc_t(rand_probs(4, 8, 0), k_layer, k_base, k_orig)


# ---------------------------------------------------------------- Alloc-T: padding mask

@pytest.mark.parametrize("k_base,k_layer", [(1, 1.5), (0, 2.25), (1, 3.0), (2, 2.5), (3, 3.0), (0, 0.5)])
def test_alloc_t_token_mask_small_brute_force(k_base, k_layer):
    k_orig, E = 3, 5
    for seed, real in enumerate([[1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 0, 1]]):
        real = np.array(real, dtype=bool)
        probs = rand_probs(len(real), E, seed=100 + seed)
        p = probs.numpy()
        m = alloc_t(probs, k_layer, k_base, k_orig, token_mask=torch.from_numpy(real)).numpy()
        check_alloc_t_invariants(m, p, k_layer, k_base, k_orig, real=real)
        ref = brute_alloc_t(p[real], k_layer, k_base, k_orig)  # the same problem on the real tokens only
        assert np.array_equal(m[real], ref)


@pytest.mark.parametrize("n_real", [0, 1, 37, 128, 255, 256])
def test_alloc_t_token_mask_large(n_real):
    T, E, k_orig, k_base, k_layer = 256, 64, 6, 1, 2.75
    probs = rand_probs(T, E, seed=n_real, dtype=torch.float32)
    g = torch.Generator().manual_seed(n_real)
    real = torch.zeros(T, dtype=torch.bool)
    real[torch.randperm(T, generator=g)[:n_real]] = True
    m = alloc_t(probs, k_layer, k_base, k_orig, token_mask=real).numpy()
    p = probs.double().numpy()
    check_alloc_t_invariants(m, p, k_layer, k_base, k_orig, real=real.numpy())
    check_optimality_certificate(m, p, k_base, k_orig, real=real.numpy())


def test_alloc_t_all_real_mask_equals_no_mask():
    probs = rand_probs(40, 16, seed=5, dtype=torch.float32)
    a = alloc_t(probs, 2.5, 1, 4)
    b = alloc_t(probs, 2.5, 1, 4, token_mask=torch.ones(40, dtype=torch.bool))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- slot allocators on unsorted candidate slots

SLOT_CALLS = [
    ("topk", dict(k=1)), ("topk", dict(k=3)), ("topk", dict(k=6)),
    ("alloc-t", dict(k_layer=2.5, k_base=1)), ("alloc-t", dict(k_layer=3.0, k_base=0)), ("alloc-t", dict(k_layer=6.0, k_base=2)),
    ("top-p", dict(threshold=0.0)), ("top-p", dict(threshold=0.5)), ("top-p", dict(threshold=0.8)), ("top-p", dict(threshold=1.0)),
    ("naee", dict(threshold=0.0)), ("naee", dict(threshold=0.3)), ("naee", dict(threshold=1.0)),
]


def test_token_methods_registry():
    """The registry is the plan schema's enum (`core.plan.TOKEN_ALLOCATIONS`, which planning reads without torch)."""
    from alloc_moe.core.plan import THRESHOLD_ALLOCATIONS, TOKEN_ALLOCATIONS

    assert set(TOKEN_METHODS) == {"topk", "alloc-t", "top-p", "naee"}
    assert tuple(TOKEN_METHODS) == TOKEN_ALLOCATIONS and set(THRESHOLD_ALLOCATIONS) < set(TOKEN_ALLOCATIONS)


@pytest.mark.parametrize("name,kw", SLOT_CALLS, ids=[f"{n}-{list(k.values())}" for n, k in SLOT_CALLS])
def test_slot_allocators_ignore_slot_order(name, kw):
    T, E, K = 48, 64, 6
    probs = rand_probs(T, E, seed=len(name), dtype=torch.float32)
    sorted_scores = probs.topk(K, dim=-1).values  # [T, K] descending
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(K, generator=g) for _ in range(T)])  # shuffled[t, j] = sorted[t, perm[t, j]]
    shuffled = sorted_scores.gather(1, perm)
    fn = TOKEN_METHODS[name]
    keep_sorted = fn(sorted_scores, **kw)
    keep_shuffled = fn(shuffled, **kw)
    assert keep_shuffled.shape == (T, K) and keep_shuffled.dtype == torch.bool
    assert torch.equal(keep_shuffled, keep_sorted.gather(1, perm))
    # and the kept set on sorted slots matches the per-token references
    s = sorted_scores.double().numpy()
    ks = keep_sorted.numpy()
    if name == "topk":
        assert (ks.sum(1) == min(kw["k"], K)).all() and ks[:, : kw["k"]].all()
    elif name == "top-p":
        assert np.array_equal(ks, top_p_ref(s, kw["threshold"], K))
    elif name == "naee":
        assert np.array_equal(ks, naee_ref(s, kw["threshold"], K))
    else:
        assert ks.sum() == exact_floor(T, kw["k_layer"]) and ks[:, : kw["k_base"]].all()
        check_optimality_certificate(ks, s, kw["k_base"], K)


def test_alloc_t_slots_with_padding_on_unsorted_slots():
    T, K = 20, 4
    scores = rand_probs(T, 16, seed=9, dtype=torch.float32).topk(K, dim=-1).values
    g = torch.Generator().manual_seed(2)
    perm = torch.stack([torch.randperm(K, generator=g) for _ in range(T)])
    real = torch.arange(T) % 3 != 0
    fn = TOKEN_METHODS["alloc-t"]
    a = fn(scores, k_layer=1.75, k_base=1, token_mask=real)
    b = fn(scores.gather(1, perm), k_layer=1.75, k_base=1, token_mask=real)
    assert torch.equal(b, a.gather(1, perm))
    assert int(a.sum()) == math.floor(int(real.sum()) * 1.75) and not a[~real].any()


# ---------------------------------------------------------------- top-p and NAEE on full rows

@pytest.mark.parametrize("k_orig", [1, 2, 4, 6, 8])
def test_top_p_mask_reference(k_orig):
    probs = rand_probs(200, 16, seed=k_orig, scale=1.5)
    p = probs.numpy()
    rng = np.random.default_rng(k_orig)
    for thr in [0.0, 1e-9, 1.0, *rng.random(6)]:
        m = top_p_mask(probs, float(thr), k_orig).numpy()
        assert np.array_equal(m, top_p_ref(p, float(thr), k_orig)), thr
        assert (m.sum(1) >= 1).all() and (m.sum(1) <= k_orig).all()
    assert (top_p_mask(probs, 0.0, k_orig).sum(-1) == 1).all()
    assert (top_p_mask(probs, 1.0, k_orig).sum(-1) == k_orig).all()


def test_top_p_includes_crossing_expert():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    assert top_p_mask(probs, 0.5, 4).tolist() == [[True, False, False, False]]  # 0.5 reaches p exactly
    assert top_p_mask(probs, 0.6, 4).tolist() == [[True, True, False, False]]  # 0.8 crosses 0.6
    assert top_p_mask(probs, 0.9, 2).tolist() == [[True, True, False, False]]  # capped at k_orig


@pytest.mark.parametrize("k_orig", [1, 2, 4, 8])
def test_naee_mask_reference(k_orig):
    probs = rand_probs(200, 32, seed=10 + k_orig, scale=1.5)
    p = probs.numpy()
    for beta in [0.0, 0.05, 0.2, 0.5, 0.9, 1.0]:
        m = naee_mask(probs, beta, k_orig).numpy()
        assert np.array_equal(m, naee_ref(p, beta, k_orig)), beta
    assert (naee_mask(probs, 0.0, k_orig).sum(-1) == k_orig).all()
    assert (naee_mask(probs, 1.0, k_orig).sum(-1) == 1).all()


# ---------------------------------------------------------------- mask_to_slots

@pytest.mark.parametrize("dropped_id", [64, -1])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_mask_to_slots(dropped_id, wdtype):
    T, E, K = 70, 64, 6
    probs = rand_probs(T, E, seed=3, dtype=torch.float32)
    mask = alloc_t(probs, 2.5, 1, K)
    weights = probs.to(wdtype)
    ids, w, keep = mask_to_slots(mask, weights, K, dropped_id)
    assert ids.shape == w.shape == keep.shape == (T, K)
    assert w.dtype == wdtype and keep.dtype == torch.bool
    for t in range(T):
        kept_ids = {int(i) for i, k in zip(ids[t], keep[t]) if k}
        assert kept_ids == set(torch.nonzero(mask[t]).flatten().tolist())
        assert int(keep[t].sum()) == int(mask[t].sum())
        for i, wt, k in zip(ids[t].tolist(), w[t], keep[t].tolist()):
            if k:
                assert wt == weights[t, i]
            else:
                assert i == dropped_id and float(wt) == 0.0


def test_mask_to_slots_full_and_empty_rows():
    probs = rand_probs(3, 8, seed=4, dtype=torch.float32)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0] = topk_mask(probs[:1], 4)[0]  # full row: 4 of 4 slots
    ids, w, keep = mask_to_slots(mask, probs, 4, 8)
    assert keep[0].all() and set(ids[0].tolist()) == set(torch.nonzero(mask[0]).flatten().tolist())
    assert not keep[1:].any() and (ids[1:] == 8).all() and (w[1:] == 0).all()


# ---------------------------------------------------------------- static graph: no data-dependent host sync

def test_sync_detector_sanity():
    p = rand_probs(8, 6, 0, dtype=torch.float32)
    assert sync_ops(graph_ops(lambda x: x * x.sum().item(), p))
    assert sync_ops(graph_ops(lambda x: x[x > 0.1].sum(), p))
    assert sync_ops(graph_ops(lambda x: x.nonzero(), p))
    assert not sync_ops(graph_ops(lambda x: x.topk(2, dim=-1).values, p))


@pytest.mark.parametrize("with_mask", [False, True])
def test_alloc_t_traces_without_host_sync(with_mask):
    p = rand_probs(32, 16, 0, dtype=torch.float32)
    tm = torch.arange(32) % 5 != 0
    if with_mask:
        ops = graph_ops(lambda x, m: alloc_t(x, 2.5, 1, 4, token_mask=m), p, tm)
    else:
        ops = graph_ops(lambda x: alloc_t(x, 2.5, 1, 4), p)
    assert ops and not sync_ops(ops), sync_ops(ops)


@pytest.mark.parametrize("fn", [
    lambda x: top_p_mask(x, 0.6, 4), lambda x: naee_mask(x, 0.3, 4), lambda x: topk_mask(x, 4),
    lambda x: mask_to_slots(alloc_t(x, 2.5, 1, 4), x, 4, 16),
], ids=["top-p", "naee", "topk", "mask_to_slots"])
def test_other_token_functions_trace_without_host_sync(fn):
    ops = graph_ops(fn, rand_probs(32, 16, 0, dtype=torch.float32))
    assert not sync_ops(ops), sync_ops(ops)


def test_alloc_t_dynamo_single_graph():
    """TorchDynamo captures alloc_t as one graph with no graph break (a host sync such as .item() would break it);
    run with the eager backend so that no C++ compilation is involved."""
    import torch._dynamo

    p = rand_probs(64, 16, 1, dtype=torch.float32)
    tm = torch.arange(64) % 7 != 0

    def f(x, m):
        return alloc_t(x, 2.25, 1, 4, token_mask=m)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(p, tm)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(p, tm), f(p, tm))
    torch._dynamo.reset()


@pytest.mark.slow
def test_alloc_t_inductor_fullgraph():
    """Inductor (the compiler vLLM's torch.compile uses) builds alloc_t as one graph, with and without a padding mask,
    and it matches eager. Runs by default: this is what makes "graph-safe" a checked claim (~20 s on 2 CPU cores)."""
    import torch._dynamo

    p = rand_probs(64, 16, 1, dtype=torch.float32)
    tm = torch.arange(64) % 9 != 0
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, m: alloc_t(x, 2.25, 1, 4, token_mask=m), fullgraph=True)
    assert torch.equal(compiled(p, tm), alloc_t(p, 2.25, 1, 4, token_mask=tm))
    assert torch.equal(compiled(p, torch.ones(64, dtype=torch.bool)), alloc_t(p, 2.25, 1, 4))
    torch._dynamo.reset()


# ---------------------------------------------------------------- threshold calibration

def _recorded_scores(N, K, seed, E=64):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(N, E, generator=g) * 3, dim=-1)
    return probs.topk(K, dim=-1).values  # [N, K] sorted


def _mean_activations_ref(method, scores, thr):
    s = scores.double().numpy()
    ref = top_p_ref if method == "top-p" else naee_ref
    return ref(s, thr, s.shape[1]).sum(1).mean()


@pytest.mark.parametrize("method", ["top-p", "naee"])
@pytest.mark.parametrize("K,target", [(4, 1.5), (4, 2.0), (4, 3.5), (6, 2.0), (6, 3.5), (8, 1.5), (8, 3.5)])
def test_calibrate_threshold_hits_target(method, K, target):
    N = 2000
    scores = _recorded_scores(N, K, seed=K * 10 + int(target * 2))
    thr = calibrate_threshold(method, scores, target)
    assert 0.0 <= thr <= 1.0
    got = _mean_activations_ref(method, scores, thr)
    # 0.5 % of the target, plus two tokens' worth of slack for float32-vs-float64 rounding at the boundary
    assert abs(got - target) <= 0.005 * target + 2 / N, (thr, got)


@pytest.mark.parametrize("method", ["top-p", "naee"])
def test_calibrate_threshold_edges(method):
    scores = _recorded_scores(500, 4, seed=1)
    for target in (1.0, 4.0):
        thr = calibrate_threshold(method, scores, target)
        assert abs(_mean_activations_ref(method, scores, thr) - target) <= 0.005 * target + 2 / 500


@pytest.mark.parametrize("method", ["top-p", "naee"])
def test_calibrate_threshold_errors(method):
    one = _recorded_scores(1, 4, seed=0)
    with pytest.raises(AllocMoeError):
        calibrate_threshold(method, one, 1.5)  # one token: only integer means are reachable
    few = _recorded_scores(3, 4, seed=0)
    with pytest.raises(AllocMoeError):
        calibrate_threshold(method, few, 2.2)  # 3 tokens: means are multiples of 1/3
    scores = _recorded_scores(200, 4, seed=0)
    for bad in (0.5, 4.5, 0.0, 9):
        with pytest.raises(AllocMoeError) as e:
            calibrate_threshold(method, scores, bad)
        assert "4" in str(e.value)


def test_calibrate_threshold_unknown_method():
    with pytest.raises(AllocMoeError):
        calibrate_threshold("alloc-t", _recorded_scores(100, 4, seed=0), 2.0)
