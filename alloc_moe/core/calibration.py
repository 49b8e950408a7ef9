"""Budget calibration of the threshold baselines (Appendix A.1).

Dynamic-MoE's top-p and NAEE's beta are bisected per layer on recorded routing probabilities (each token's top-K_orig
candidate scores) so that the mean number of activations per token matches the layer budget.
"""

import torch

from ..errors import AllocMoeError
from .token_alloc import naee_slots, top_p_slots

# activations per token grow with p (top-p) and shrink with beta (NAEE)
_SLOTS = {"top-p": (top_p_slots, +1), "naee": (naee_slots, -1)}


def mean_activations(method: str, scores: torch.Tensor, threshold: float) -> float:
    slots, _ = _SLOTS[method]
    return slots(scores, threshold=threshold).sum(dim=-1, dtype=torch.float64).mean().item()


def calibrate_threshold(method: str, scores: torch.Tensor, target: float, *, rel_tol: float = 0.005, iters: int = 60) -> float:
    """Bisect the threshold in [0, 1] so mean activations per token of `scores [N, K_orig]` hit `target` within rel_tol.

    Raises AllocMoeError when no threshold gets within the tolerance (too few recorded tokens, or ties).
    """
    if method not in _SLOTS:
        raise AllocMoeError(f"no threshold to calibrate for {method!r}; allowed: {', '.join(_SLOTS)}")
    K = scores.shape[-1]
    if not 1 <= target <= K:
        raise AllocMoeError(f"target {target} activations per token is outside 1..{K} for {method}")
    scores = scores.reshape(-1, K).float()
    _, direction = _SLOTS[method]
    lo, hi = 0.0, 1.0
    best, best_err = None, float("inf")
    for _ in range(iters):
        mid = (lo + hi) / 2
        got = mean_activations(method, scores, mid)
        err = abs(got - target)
        if err < best_err:
            best, best_err = mid, err
        if err == 0:
            break
        if (got < target) == (direction > 0):
            lo = mid
        else:
            hi = mid
    for edge in (0.0, 1.0):  # the ends of the range are reachable too
        err = abs(mean_activations(method, scores, edge) - target)
        if err < best_err:
            best, best_err = edge, err
    if best_err > rel_tol * target:
        raise AllocMoeError(
            f"{method} calibration reached {target + best_err:.4f} or {target - best_err:.4f} activations per token, "
            f"not {target} within {rel_tol:.1%}: record more tokens ({scores.shape[0]} given)"
        )
    return best
