"""Alloc-MoE: budget-aware expert activation allocation for Mixture-of-Experts inference.

The public names below are imported on first use (PEP 562), so `import alloc_moe.<module>` loads only what that
module needs: the workflow hashes each rule's module closure to decide what to re-run.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alloc-moe")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

# public name -> the module that defines it
_PUBLIC = {
    "budget_range": "core.budget", "check_budget": "core.budget", "calibrate_threshold": "core.calibration",
    "AllocMoeError": "errors", "LAYER_METHODS": "core.layer_alloc", "alloc_l": "core.layer_alloc", "ascending": "core.layer_alloc",
    "descending": "core.layer_alloc", "lexi": "core.layer_alloc", "normalize_sensitivity": "core.layer_alloc",
    "uniform": "core.layer_alloc", "Plan": "core.plan", "build_plan": "core.plan", "TOKEN_METHODS": "core.token_alloc",
    "alloc_t": "core.token_alloc", "mask_to_slots": "core.token_alloc", "naee_mask": "core.token_alloc",
    "top_p_mask": "core.token_alloc", "topk_mask": "core.token_alloc",
}

__all__ = sorted([*_PUBLIC, "apply"])


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alloc_moe' has no attribute {name!r}")


def __dir__():
    return __all__


def apply(model, plan, **kwargs):
    """Apply a plan to a Hugging Face MoE model; see `alloc_moe.backends.hf.apply.apply`."""
    from .backends.hf.apply import apply as _apply

    return _apply(model, plan, **kwargs)
