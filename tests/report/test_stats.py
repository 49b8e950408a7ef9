"""`alloc_moe.report.stats`: paired effect, standard errors and bootstrap intervals against hand-computed cases, scipy
(ttest_rel, bootstrap with paired=True) and properties (order invariance, zero width for identical methods)."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from alloc_moe.errors import AllocMoeError
from alloc_moe.report.stats import bootstrap_interval, effect, paired_se, resampled_means, stratum, unpaired_se

A, B = [1, 0, 1, 1], [0, 0, 1, 0]  # differences 1, 0, 0, 1


def test_hand_computed_effect_and_standard_errors():
    s = [stratum(A, B)]
    assert effect(s) == 0.5
    assert paired_se(s) == pytest.approx(np.sqrt(1 / 12))  # var(d) = 1/3 (ddof 1), over 4 items
    assert unpaired_se(s) == pytest.approx(np.sqrt(0.25 / 4 + 0.25 / 4))
    # a group: the mean of two tasks (weights 1/2), resampled within each task
    g = [stratum(A, B, 0.5), stratum([1, 1], [1, 0], 0.5)]
    assert effect(g) == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert paired_se(g) == pytest.approx(np.sqrt(0.25 / 12 + 0.25 * 0.5 / 2))


def test_hand_computed_bootstrap_intervals():
    # two items with differences 0 and 1: resampled means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_interval([[stratum([0, 1], [0, 0])]]) == (0.0, 1.0)
    assert bootstrap_interval([[stratum([0, 1], [0, 0])]], confidence=0.4) == (0.5, 0.5)
    # two seeds with constant differences 2 and 4: drawn seeds give 2, 3 or 4 (1/4, 1/2, 1/4)
    seeds = [[stratum([2, 2, 2], [0, 0, 0], 0.5)], [stratum([4, 4], [0, 0], 0.5)]]
    assert bootstrap_interval(seeds) == pytest.approx((2.0, 4.0))
    assert effect([s for st_ in seeds for s in st_]) == 3.0


def test_paired_se_is_ttest_rel_standard_error():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 300)
    b = np.where(rng.random(300) < 0.9, a, 1 - a)  # the same answer on 90% of the items
    t = scipy.stats.ttest_rel(a, b)
    s = [stratum(a, b)]
    assert effect(s) / paired_se(s) == pytest.approx(t.statistic)
    assert paired_se(s) < unpaired_se(s) / 2  # correlated methods: paired intervals are much narrower


def test_bootstrap_agrees_with_scipy_paired_percentile():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2, 400).astype(float)
    b = np.where(rng.random(400) < 0.85, a, 1 - a)
    ref = scipy.stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True,
                                method="percentile", n_resamples=20000, random_state=3).confidence_interval
    lo, hi = bootstrap_interval([[stratum(a, b)]], n_resamples=20000)
    width = ref.high - ref.low
    assert lo == pytest.approx(ref.low, abs=0.05 * width) and hi == pytest.approx(ref.high, abs=0.05 * width)
    # and with the normal approximation of the paired standard error
    se = paired_se([stratum(a, b)])
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_resampled_means_match_index_resampling():
    d = np.array([-1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    m = resampled_means(d, 50000, np.random.default_rng(0))
    idx = np.random.default_rng(1).integers(0, d.size, (50000, d.size))
    direct = d[idx].mean(axis=1)
    assert m.mean() == pytest.approx(direct.mean(), abs=0.01) and m.std() == pytest.approx(direct.std(), rel=0.02)


def test_bad_input_one_line():
    with pytest.raises(AllocMoeError, match="equally long"):
        stratum([1, 0], [1])
    with pytest.raises(AllocMoeError, match="at least one seed"):
        bootstrap_interval([])
    with pytest.raises(AllocMoeError, match="confidence"):
        bootstrap_interval([[stratum([1], [0])]], confidence=1.5)


items = st.lists(st.integers(0, 1), min_size=1, max_size=60)


@settings(max_examples=40, deadline=None)
@given(items, st.floats(-5, 5, allow_nan=False), st.integers(0, 2 ** 31))
def test_constant_differences_give_a_zero_width_interval_at_the_effect(a, c, seed):
    s = [stratum(np.array(a) + c, a)]
    lo, hi = bootstrap_interval([s], n_resamples=200, seed=seed)
    assert lo == pytest.approx(c, abs=1e-9) and hi == pytest.approx(c, abs=1e-9) and effect(s) == pytest.approx(c)


@settings(max_examples=40, deadline=None)
@given(items, st.integers(0, 2 ** 31))
def test_identical_methods_give_exactly_zero(a, seed):
    s = [stratum(a, a)]
    assert bootstrap_interval([s], n_resamples=200, seed=seed) == (0.0, 0.0)
    assert effect(s) == 0.0 and paired_se(s) == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=60), st.randoms())
def test_interval_invariant_to_item_order_and_within_the_range(pairs, random):
    a, b = map(np.array, zip(*pairs))
    shuffled = list(pairs)
    random.shuffle(shuffled)
    a2, b2 = map(np.array, zip(*shuffled))
    lo, hi = bootstrap_interval([[stratum(a, b)]], n_resamples=300, seed=7)
    assert (lo, hi) == bootstrap_interval([[stratum(a2, b2)]], n_resamples=300, seed=7)
    d = a - b
    assert d.min() <= lo <= hi <= d.max()
    assert paired_se([stratum(a, b)]) == pytest.approx(paired_se([stratum(a2, b2)]))


def test_deterministic_per_seed():
    s = [[stratum([1, 0, 1, 0, 1], [0, 0, 1, 1, 0])]]
    assert bootstrap_interval(s, seed=5) == bootstrap_interval(s, seed=5)


# ---- clustered items (emb_world's items by the fact they ask about) ----------------------------------------------
def test_cluster_robust_se_hand_computed_and_one_item_per_cluster_is_the_plain_se():
    # d = a - b = [1, 1, 0, 0, 2, 0]; clusters x: items 0-1, y: 2-3, z: 4-5; mean 4/6
    a, b = [1, 1, 0, 0, 2, 1], [0, 0, 0, 0, 0, 1]
    s = stratum(a, b, cluster=["x", "x", "y", "y", "z", "z"])
    m = 4 / 6
    u = [2 - 2 * m, 0 - 2 * m, 2 - 2 * m]  # each cluster's summed deviation
    assert paired_se([s]) == pytest.approx(np.sqrt(3 / 2 * sum(x * x for x in u) / 36))
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    plain, single = stratum(a, b), stratum(a, b, cluster=range(50))
    assert paired_se([single]) == pytest.approx(paired_se([plain]))
    assert unpaired_se([single]) == pytest.approx(unpaired_se([plain]))
    lo, hi = bootstrap_interval([[single]], n_resamples=20000)
    plo, phi = bootstrap_interval([[plain]], n_resamples=20000)
    assert lo == pytest.approx(plo, abs=2.5) and hi == pytest.approx(phi, abs=2.5)  # same distribution, other draws


def test_items_copied_within_clusters_add_no_information():
    """Each of 40 pairs copied 10 times: as 400 independent items the SE is ~sqrt(10) too small; as 40 clusters it
    is the SE of the 40 distinct items (up to the G / (G - 1) correction), and so is the bootstrap's width."""
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 2, 40).astype(float), rng.integers(0, 2, 40).astype(float)
    base = stratum(a, b)
    rep = stratum(np.repeat(a, 10), np.repeat(b, 10))
    clus = stratum(np.repeat(a, 10), np.repeat(b, 10), cluster=np.repeat(np.arange(40), 10))
    assert paired_se([rep]) < 0.35 * paired_se([base])
    assert paired_se([clus]) == pytest.approx(paired_se([base]), rel=1e-9)
    w = lambda s: np.subtract(*bootstrap_interval([[s]], n_resamples=20000)[::-1])
    assert w(clus) == pytest.approx(w(base), rel=0.1) and w(rep) < 0.5 * w(base)


def test_cluster_labels_must_match_the_items():
    with pytest.raises(AllocMoeError, match="^give one cluster label per item: 2 labels for 3 items$"):
        stratum([1, 0, 1], [0, 0, 1], cluster=["a", "b"])
