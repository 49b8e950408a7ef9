"""Activation budgets (paper section 3.1).

The global budget B is the sum over the L MoE layers of the per-layer average number of expert activations per
token. It is valid when every layer can give each token at least max(1, K_base) experts and at most K_orig:
L * max(1, K_base) <= B <= L * K_orig. Token-level modes accept a fractional per-layer average (Qwen: 84 / 24 = 3.5);
layer-level top-k needs an integer K per layer, so only floor(B) activations can be spent there.
"""

import math

from ..errors import AllocMoeError


def budget_range(num_layers: int, k_orig: int, k_base: int = 1) -> tuple[int, int]:
    """The smallest and largest valid global budget."""
    return num_layers * max(1, k_base), num_layers * k_orig


def check_budget(budget: float, num_layers: int, k_orig: int, k_base: int = 1) -> float:
    """Return `budget` as a float, or raise a one-line error with the valid range."""
    if num_layers < 1:
        raise AllocMoeError(f"a budget needs at least one MoE layer, got {num_layers}")
    if k_orig < 1:
        raise AllocMoeError(f"k_orig must be >= 1, got {k_orig}")
    if not 0 <= k_base <= k_orig:
        raise AllocMoeError(f"k_base must be in 0..k_orig={k_orig}, got {k_base}")
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise AllocMoeError(f"budget must be a number, got {budget!r}") from None
    lo, hi = budget_range(num_layers, k_orig, k_base)
    if not math.isfinite(b) or not lo <= b <= hi:
        raise AllocMoeError(
            f"budget {budget} is out of range: with {num_layers} MoE layers, K_orig={k_orig} and K_base={k_base} "
            f"it must be between {lo} and {hi} (L*max(1,K_base) .. L*K_orig)"
        )
    return b


def integer_budget(budget: float) -> int:
    """The activations a layer-level (integer K) allocation may spend: floor(B), tolerant of float noise."""
    return int(math.floor(budget + 1e-9))
