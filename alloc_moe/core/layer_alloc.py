"""Layer-level allocation: one K per MoE layer under a global budget B.

Every allocator returns a list with one entry per MoE layer (in MoE-layer order), 1 <= K_l <= K_orig.
`LAYER_METHODS` maps a method name to its allocator; all share the signature
`fn(*, budget, num_layers, k_orig, sensitivity=None, integer=True) -> list[int | float]`.
"""

import math
from collections.abc import Callable

import numpy as np

from ..errors import AllocMoeError
from .budget import check_budget, integer_budget

NORMALIZATIONS = ("none", "relative", "log")
DEFAULT_NORMALIZATION = "relative"


def normalize_sensitivity(S: np.ndarray, mode: str = DEFAULT_NORMALIZATION) -> np.ndarray:
    """Normalise a raw perplexity matrix S[L, K_orig] (S[i, k-1] = ppl with layer i at k experts) row by row.

    - "none": use the values as they are. Adding a per-row constant never changes the DP optimum, so this is
      also what a difference normalisation (S[i,k] - S[i,K_orig]) gives.
    - "relative" (default): S[i,k] / S[i,K_orig] - 1, the relative perplexity increase of layer i at k experts.
      This is our reading of the paper's "normalized row ... relative loss". Dividing by a per-row value re-weights
      rows, so it can change the optimum compared with "none".
    - "log": log S[i,k] - log S[i,K_orig], i.e. the increase in mean NLL (log-perplexity), which adds up across
      layers to first order; close to "relative" when the increases are small.
    """
    S = np.asarray(S, dtype=np.float64)
    if mode == "none":
        return S.copy()
    ref = S[:, -1:]  # [L, 1] value at K_orig
    if mode == "relative":
        if np.any(ref == 0):
            raise AllocMoeError("relative normalisation needs a non-zero value at K_orig in every row; use --normalization none")
        return S / ref - 1.0
    if mode == "log":
        if np.any(S <= 0):
            raise AllocMoeError("log normalisation needs positive values (perplexities); use --normalization none")
        return np.log(S) - np.log(ref)
    raise AllocMoeError(f"unknown normalisation {mode!r}; allowed: {', '.join(NORMALIZATIONS)}")


def alloc_l(S, budget: float, exact: bool = False) -> list[int]:
    """Exact dynamic program of eq. 6 on S exactly as given (no normalisation).

    S[i, k-1] is the cost of giving MoE layer i k experts, shape [L, K_orig]. Minimises sum_i S[i, K_i] subject to
    sum_i K_i <= floor(B) (paper eq. 4), or == floor(B) with `exact` (equal-compute comparisons when fewer experts
    happen to cost less, e.g. on an untrained model), 1 <= K_i <= K_orig. Ties (exactly equal total cost) are broken deterministically toward the
    uniform allocation: among optimal allocations the one with the smallest sum_i (K_i - B/L)^2 wins, then the
    first found.
    """
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] < 1 or S.shape[1] < 1:
        raise AllocMoeError(f"sensitivity must be a non-empty [layers, K_orig] matrix, got shape {S.shape}")
    if not np.all(np.isfinite(S)):
        raise AllocMoeError("sensitivity matrix contains NaN or inf")
    L, K = S.shape
    B = integer_budget(check_budget(budget, L, K))
    target = B / L
    ks = np.arange(1, K + 1)  # [K]
    dev = (ks - target) ** 2  # [K] secondary cost of each choice
    inf = np.inf
    # cost[b], tie[b]: best (primary, secondary) cost of the layers so far using exactly b activations
    cost = np.full(B + 1, inf)
    tie = np.full(B + 1, inf)
    cost[0] = tie[0] = 0.0
    choice = np.zeros((L, B + 1), dtype=np.int64)  # [L, B+1] k chosen for layer i at total b
    b_idx = np.arange(B + 1)
    for i in range(L):
        src = b_idx[None, :] - ks[:, None]  # [K, B+1] budget before layer i
        valid = src >= 0
        src = np.where(valid, src, 0)
        cand = np.where(valid, cost[src] + S[i][:, None], inf)  # [K, B+1]
        cand_tie = np.where(valid, tie[src] + dev[:, None], inf)
        best = cand.min(axis=0)  # [B+1]
        cand_tie = np.where(cand == best[None, :], cand_tie, inf)
        pick = cand_tie.argmin(axis=0)  # [B+1] first minimum: smallest k among exact ties
        choice[i] = pick + 1
        cost = best
        tie = np.where(np.isfinite(best), cand_tie[pick, b_idx], inf)
    # eq. 6 final step: argmin over b <= B, same tie rule
    if exact:
        b = B
    else:
        best_cost = cost.min()
        b = int(np.where(cost == best_cost, tie, inf).argmin())
    out = [0] * L
    for i in range(L - 1, -1, -1):
        out[i] = int(choice[i, b])
        b -= out[i]
    return out


def uniform(*, budget: float, num_layers: int, k_orig: int, sensitivity=None, integer: bool = True) -> list:
    """Equal K in every layer. With `integer`, floor(B) is spread so the K differ by at most one and sum to floor(B);
    the layers that get the extra activation are evenly spaced over depth."""
    B = check_budget(budget, num_layers, k_orig)
    if not integer:
        return [B / num_layers] * num_layers
    B = integer_budget(B)
    base, rem = divmod(B, num_layers)
    out = [base] * num_layers
    for j in range(rem):
        out[(2 * j + 1) * num_layers // (2 * rem)] += 1
    return out


def _ramp_sums(num_layers: int, k_min: int, k_max: int) -> tuple[int, int]:
    """Smallest and largest sum of a non-decreasing, step <= 1 sequence from k_min (first) to k_max (last)."""
    rise = k_max - k_min  # number of +1 steps needed
    ramp = sum(range(k_min, k_max + 1))
    return ramp + (num_layers - rise - 1) * k_min, ramp + (num_layers - rise - 1) * k_max


def ascending(*, budget: float, num_layers: int, k_orig: int, sensitivity=None, integer: bool = True) -> list[int]:
    """Appendix A.1 Ascending schedule: K grows with depth from K_min to K_max, step <= 1, sum == floor(B).

    K_min = 1 and K_max = K_orig, except that K_min is raised only when B is larger than the schedule can hold
    (as the paper says), and - our extension for budgets the paper never uses - K_max is lowered when B is smaller
    than the shallowest ramp can hold.
    """
    B = integer_budget(check_budget(budget, num_layers, k_orig))
    L = num_layers
    if L == 1:
        return [B]
    k_min, k_max = 1, min(k_orig, L)
    while _ramp_sums(L, k_min, k_max)[1] < B:  # raise K_min until B fits
        k_min += 1
        k_max = min(k_orig, k_min + L - 1)
    while _ramp_sums(L, k_min, k_max)[0] > B:  # lower K_max until B fits
        k_max -= 1
    # rounded linear interpolation (round half up), then bi-directional passes for monotonicity and step <= 1
    K = [int(math.floor(k_min + (k_max - k_min) * i / (L - 1) + 0.5)) for i in range(L)]
    for i in range(1, L):
        K[i] = min(max(K[i], K[i - 1]), K[i - 1] + 1)
    for i in range(L - 2, -1, -1):
        K[i] = min(max(K[i], K[i + 1] - 1), K[i + 1])
    # greedy adjustment of inner layers, one activation at a time, only where the shape constraints still hold
    inner = range(1, L - 1)
    while sum(K) < B:
        i = next(i for i in reversed(inner) if K[i - 1] == K[i] and K[i + 1] == K[i] + 1)
        K[i] += 1
    while sum(K) > B:
        i = next(i for i in inner if K[i + 1] == K[i] and K[i - 1] == K[i] - 1)
        K[i] -= 1
    return K


def descending(*, budget: float, num_layers: int, k_orig: int, sensitivity=None, integer: bool = True) -> list[int]:
    """Appendix A.1 Descending schedule: the Ascending one in reverse layer order."""
    return ascending(budget=budget, num_layers=num_layers, k_orig=k_orig)[::-1]


def _require(sensitivity, method: str, num_layers: int, k_orig: int) -> np.ndarray:
    if sensitivity is None:
        raise AllocMoeError(f"method {method!r} needs a sensitivity matrix (--sensitivity S.csv)")
    S = np.asarray(sensitivity, dtype=np.float64)
    if S.shape != (num_layers, k_orig):
        raise AllocMoeError(f"sensitivity has shape {S.shape}, expected ({num_layers}, {k_orig}) for this model")
    return S


def alloc_l_method(*, budget, num_layers, k_orig, sensitivity=None, integer=True, normalization=DEFAULT_NORMALIZATION,
                   exact=False):
    """Alloc-L on a raw Algorithm-1 perplexity matrix: normalise the rows, then solve eq. 6 exactly."""
    S = _require(sensitivity, "alloc-l", num_layers, k_orig)
    return alloc_l(normalize_sensitivity(S, normalization), budget, exact)


def lexi(*, budget, num_layers, k_orig, sensitivity=None, integer=True, exact=False):
    """LExI's per-layer K from its data-free sensitivity matrix (output deviation at k vs K_orig).

    LExI searches this separable objective with an evolutionary algorithm; the exact DP finds its optimum
    directly, so we use the DP. The deviations are used as they are (their K_orig column is 0, so a ratio
    normalisation is undefined).
    """
    S = _require(sensitivity, "lexi", num_layers, k_orig)
    return alloc_l(S, budget, exact)


LAYER_METHODS: dict[str, Callable[..., list]] = {
    "alloc-l": alloc_l_method,
    "uniform": uniform,
    "ascending": ascending,
    "descending": descending,
    "lexi": lexi,
}
NEEDS_SENSITIVITY = {"alloc-l", "lexi"}


def allocate_layers(method: str, **kwargs) -> list:
    try:
        fn = LAYER_METHODS[method]
    except KeyError:
        raise AllocMoeError(f"unknown layer method {method!r}; allowed: {', '.join(LAYER_METHODS)}") from None
    return fn(**kwargs)
