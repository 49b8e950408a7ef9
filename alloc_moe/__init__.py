"""Alloc-MoE: budget-aware expert activation allocation for Mixture-of-Experts inference."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alloc-moe")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

from .budget import budget_range, check_budget
from .calibration import calibrate_threshold
from .errors import AllocMoeError
from .layer_alloc import LAYER_METHODS, alloc_l, ascending, descending, lexi, normalize_sensitivity, uniform
from .plan import Plan, build_plan
from .token_alloc import TOKEN_METHODS, alloc_t, mask_to_slots, naee_mask, top_p_mask, topk_mask

__all__ = [
    "AllocMoeError", "LAYER_METHODS", "TOKEN_METHODS", "Plan", "alloc_l", "alloc_t", "apply", "ascending",
    "budget_range", "build_plan", "calibrate_threshold", "check_budget", "descending", "lexi", "mask_to_slots",
    "naee_mask", "normalize_sensitivity", "top_p_mask", "topk_mask", "uniform",
]


def apply(model, plan, **kwargs):
    """Apply a plan to a Hugging Face MoE model; see `alloc_moe.hf_backend.apply`."""
    from .hf_backend import apply as _apply

    return _apply(model, plan, **kwargs)
