"""Paired statistics of a difference between two methods evaluated on the same items (the claims table's intervals).

Every comparison is a weighted mean of per-stratum mean differences,

    effect = sum_j w_j * mean_i (a_ij - b_ij),

where a stratum j is one task's items for one training seed, scored by both methods (paired: item i is the same
document for both), and the weights make the effect what the report compares: one task (w = 1), a group score (the
mean of its tasks: w = 1/n_tasks, split evenly over the leaf tasks of an lm-eval group or tag), the mean of the
groups, or the mean over seeds (each seed's weights sum to 1/n_seeds).

- `effect`: the point estimate above.
- `paired_se`: its standard error from the per-item differences, sqrt(sum_j w_j^2 var(d_j) / n_j) (ddof 1); for one
  stratum this is the standard error of `scipy.stats.ttest_rel`. With several seeds it is conditional on the seeds'
  trained models. `unpaired_se` is the same from the two methods' own variances (what two independent error bars
  imply): the paired one is smaller whenever the methods' per-item scores are positively correlated.
- `bootstrap_interval`: percentile bootstrap interval of the effect, seeded and deterministic. One seed: the items of
  every stratum are resampled with replacement (the same resampled items for both methods: paired), independently
  per stratum. Several seeds: the seeds are resampled with replacement, then the items within each drawn seed (two
  levels: the interval carries the spread between training seeds as well as the items; with 2-3 seeds it is rough).

Clustered items (a stratum with `cluster` labels: items that ask about the same thing, e.g. emb_world's items about
one of its 48 facts) are not independent: there the standard errors are cluster-robust (the variance of the mean from
the clusters' summed deviations, sum_c (sum_{i in c} (x_i - mean))^2 / n^2 x G / (G - 1) for G clusters; with one
item per cluster it is the plain var(x, ddof=1) / n) and the bootstrap resamples whole clusters (their summed
differences over their summed item counts), not items.

Resampling n items with replacement: for few distinct differences (0/1 scores give at most 3) it draws how often each
value is drawn (the same distribution, at a cost independent of n), else the indices themselves; the distinct values
are taken in sorted order, so the interval does not depend on the items' order.
"""

from typing import NamedTuple

import numpy as np

from ..errors import AllocMoeError

N_RESAMPLES = 4000
CONFIDENCE = 0.95
_CHUNK = 2_000_000  # indices drawn at once (memory: 8 bytes each)
_FEW = 16  # at most this many distinct differences: binomial counts, not indices


class Stratum(NamedTuple):
    a: np.ndarray  # [n] per-item scores of method A
    b: np.ndarray  # [n] per-item scores of method B, same items in the same order
    weight: float
    cluster: np.ndarray | None = None  # [n] int cluster index 0..G-1 of each item (None: items independent)


def stratum(a, b, weight: float = 1.0, cluster=None) -> Stratum:
    """A checked stratum: two equally long, non-empty 1-D float arrays, and optionally one cluster label per item
    (any hashable values; items with equal labels form a cluster)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise AllocMoeError(f"paired items need two equally long non-empty lists, got {a.shape} and {b.shape}")
    if cluster is not None:
        labels = list(cluster)
        if len(labels) != a.size:
            raise AllocMoeError(f"give one cluster label per item: {len(labels)} labels for {a.size} items")
        _, cluster = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
        cluster = cluster.reshape(-1)
    return Stratum(a, b, float(weight), cluster)


def effect(strata: list[Stratum]) -> float:
    return float(sum(s.weight * np.mean(s.a - s.b) for s in strata))


def _var_of_mean(x: np.ndarray, cluster: np.ndarray | None = None) -> float:
    if cluster is None:
        return float(np.var(x, ddof=1) / x.size) if x.size > 1 else 0.0
    g = int(cluster.max()) + 1
    if g < 2:
        return 0.0
    u = np.bincount(cluster, weights=x - x.mean(), minlength=g)  # [G] each cluster's summed deviation
    return float(g / (g - 1) * np.sum(u ** 2) / x.size ** 2)


def paired_se(strata: list[Stratum]) -> float:
    return float(np.sqrt(sum(s.weight ** 2 * _var_of_mean(s.a - s.b, s.cluster) for s in strata)))


def unpaired_se(strata: list[Stratum]) -> float:
    return float(np.sqrt(sum(s.weight ** 2 * (_var_of_mean(s.a, s.cluster) + _var_of_mean(s.b, s.cluster))
                             for s in strata)))


def resampled_means(d: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """[m] means of `d` [n] resampled with replacement. Few distinct values (0/1 scores: at most 3 differences): how
    often each is drawn, as a chain of binomials (the multinomial's exact conditional form), vectorised over the m
    resamples; otherwise drawn indices, _CHUNK at a time."""
    values, counts = np.unique(d, return_counts=True)
    n = d.size
    if values.size > _FEW:
        rows = max(1, _CHUNK // n)
        sums = [d[rng.integers(0, n, size=(min(rows, m - i), n))].sum(axis=1) for i in range(0, m, rows)]
        return np.concatenate(sums) / n
    sums, left, rest = np.zeros(m), np.full(m, n), n
    for v, c in zip(values[:-1], counts[:-1]):
        k = rng.binomial(left, c / rest)  # draws of v among the draws left, given those of the values before
        sums += k * v
        left -= k
        rest -= c
    return (sums + left * values[-1]) / n


def resampled_cluster_means(d: np.ndarray, cluster: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """[m] means of `d` [n] over G clusters resampled with replacement (each draw takes a whole cluster: its summed
    values and its item count)."""
    g = int(cluster.max()) + 1
    sums, counts = np.bincount(cluster, weights=d, minlength=g), np.bincount(cluster, minlength=g)  # [G], [G]
    rows = max(1, _CHUNK // g)
    out = []
    for i in range(0, m, rows):
        idx = rng.integers(0, g, size=(min(rows, m - i), g))  # [r, G] drawn clusters
        out.append(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    return np.concatenate(out)


def _resampled(s: Stratum, m: int, rng: np.random.Generator) -> np.ndarray:
    d = s.a - s.b
    return resampled_means(d, m, rng) if s.cluster is None else resampled_cluster_means(d, s.cluster, m, rng)


def bootstrap_interval(per_seed: list[list[Stratum]], *, n_resamples: int = N_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the effect of `per_seed` (each seed's strata, weights summing to that seed's share):
    items (or a clustered stratum's clusters) resampled within each stratum, and the seeds resampled too when there are
    several (module docstring)."""
    if not per_seed or not all(per_seed):
        raise AllocMoeError("a bootstrap needs at least one seed with at least one stratum")
    if not 0 < confidence < 1 or n_resamples < 1:
        raise AllocMoeError(f"confidence must be in (0, 1) and n_resamples >= 1, got {confidence}, {n_resamples}")
    rng = np.random.default_rng(seed)
    k = len(per_seed)
    total = sum(s.weight for strata in per_seed for s in strata)
    # each seed's own effect (its weights rescaled to sum to 1) at every (resample, slot): [seeds, R, k]
    per = np.stack([sum(s.weight * _resampled(s, n_resamples * k, rng) for s in strata).reshape(
        n_resamples, k) / sum(s.weight for s in strata) for strata in per_seed])
    if k == 1:
        boot = per[0, :, 0] * total
    else:  # resample the seeds (equal shares), then each drawn seed's items
        pick = rng.integers(0, k, size=(n_resamples, k))
        boot = per[pick, np.arange(n_resamples)[:, None], np.arange(k)[None, :]].mean(axis=1) * total
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)
