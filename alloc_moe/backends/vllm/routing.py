"""Apply a plan to a vLLM model (>= 0.26: `MoERunner` layers with a per-layer `router`) right after it is loaded.

- top-k mode: each layer's `router.top_k` is set to K_l before the engine compiles or captures graphs, so the router
  returns [T, K_l] and the expert kernels get T*K_l pairs (vLLM's own routing, nothing else changes).
- alloc-t / top-p / naee: the router's `_compute_routing` is wrapped. It keeps the router's [T, K_orig] slots in
  place and hands them to `alloc_moe.core.routing.drop_pairs` (the one function both backends call), which marks dropped
  pairs with expert id -1 and weight 0 (static shapes, no host sync in step scope).
  The experts must then skip them: `cpu_experts` (vLLM's CPU kernel has no bounds check) or `cuda` (Triton).

Which tokens compete in Alloc-T (`ALLOC_MOE_ALLOC_T_SCOPE`): `step` (default, the paper's setting: all tokens of
one engine step, so the result depends on batch composition) or `sequence` (each request's tokens of the step
compete among themselves; reads the step's query_start_loc, one host sync per layer).

CUDA graphs / torch.compile: the `step` scope is static-shape and sync-free (tests/backends/test_vllm_routing_graphs.py traces
it with no host-syncing op, compiles it fullgraph, and shows that padding rows spend no budget). Tokens vLLM adds to
fill a captured graph's size are flagged in the forward context's `is_padding` (vLLM >= 0.27; 0.32 sets it in
`gpu_model_runner`): they get no experts and do not count in T. The `sequence` scope needs a host sync and the step's
request boundaries, which a replayed graph would freeze: it is refused unless the engine runs eager
(`enforce_eager=True`), with one line, when the plan is applied.
"""

import dataclasses
import os
import re

import torch

from ...core import routing as core_routing
from ...core.plan import Plan
from ...core.routing import LayerRule
from ...errors import AllocMoeError
from ..hf.model import check_plan_fits

SCOPE_ENV = "ALLOC_MOE_ALLOC_T_SCOPE"
SCOPES = ("step", "sequence")
DROPPED_ID = -1  # what a dropped pair's expert id is between our router patch and our experts patch


@dataclasses.dataclass
class VllmMoeLayer:
    """One sparse MoE layer of a vLLM model; `index` is the decoder-layer index (as in plans)."""

    index: int
    name: str
    runner: torch.nn.Module
    router: torch.nn.Module
    num_experts: int
    k_orig: int


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def moe_layers(model: torch.nn.Module) -> list[VllmMoeLayer]:
    """Every module with a `router` that has `top_k` (vLLM's MoERunner), ordered by decoder-layer index."""
    out = []
    for name, mod in model.named_modules():
        router = getattr(mod, "router", None)
        if router is None or not hasattr(router, "top_k") or not hasattr(router, "_compute_routing"):
            continue
        m = _LAYER_RE.search(f".{name}.")
        if m is None:
            raise AllocMoeError(f"cannot tell the decoder layer of MoE module {name!r}")
        k = getattr(router, "_alloc_moe_k_orig", router.top_k)
        out.append(VllmMoeLayer(int(m.group(1)), name, mod, router, int(router.global_num_experts), int(k)))
    if not out:
        raise AllocMoeError(f"{type(model).__name__} has no MoE layers (no module with a router.top_k)")
    return sorted(out, key=lambda m: m.index)


def engine_is_eager() -> bool | None:
    """The engine's `enforce_eager` from vLLM's current config (set while the model loads); None if unknown."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:
        return None
    cfg = get_current_vllm_config_or_none()
    mc = getattr(cfg, "model_config", None) if cfg is not None else None
    return None if mc is None else bool(mc.enforce_eager)


def check_scope(scope: str, eager: bool | None) -> None:
    """The `sequence` scope reads request boundaries on the host: refuse it in compiled / CUDA-graph engines."""
    if scope == "sequence" and eager is False:
        raise AllocMoeError(f"{SCOPE_ENV}=sequence needs an eager engine: it reads each step's request bounds on the "
                            "host, which CUDA graphs and torch.compile cannot replay; use vllm mode eager "
                            "(--vllm-mode eager, config vllm.mode) or the step scope (the paper's)")


def alloc_t_scope() -> str:
    scope = os.environ.get(SCOPE_ENV, "step")
    if scope not in SCOPES:
        raise AllocMoeError(f"{SCOPE_ENV}={scope!r}; allowed: {', '.join(SCOPES)}")
    return scope


def _forward_context():
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context() if is_forward_context_available() else None


def _token_mask(T: int) -> torch.Tensor | None:
    """[T] True for real tokens, from the forward context's `is_padding` (None: no padding information)."""
    ctx = _forward_context()
    pad = getattr(ctx, "is_padding", None) if ctx is not None else None
    if pad is None or pad.shape[0] < T:
        return None
    return ~pad[:T]


def _sequence_bounds(T: int) -> list[int] | None:
    """Token offsets of the step's requests ([0, n_1, ..., T]) from any attention layer's metadata."""
    ctx = _forward_context()
    meta = getattr(ctx, "attn_metadata", None) if ctx is not None else None
    if isinstance(meta, list):
        meta = meta[0] if meta else None
    for m in (meta or {}).values():
        qsl = getattr(m, "query_start_loc", None)
        if qsl is not None:
            bounds = [int(x) for x in qsl.tolist() if int(x) <= T]
            return bounds if bounds and bounds[-1] == T else [*bounds, T]
    return None


def _routing_patch(router, orig, rule: LayerRule, per_sequence: bool):
    renormalize = bool(getattr(router, "renormalize", False))

    def compute_routing(hidden_states, router_logits, indices_type, **kw):
        weights, ids = orig(hidden_states, router_logits, indices_type, **kw)  # [T, K], [T, K]
        T = ids.shape[0]
        new_w, new_ids = core_routing.drop_pairs(
            router_logits, weights, ids, rule, sentinel=DROPPED_ID, renormalize=renormalize,
            token_mask=_token_mask(T) if rule.uses_token_mask else None,
            bounds=_sequence_bounds(T) if per_sequence else None)
        return new_w.contiguous(), new_ids.contiguous()

    return compute_routing


def check_fits(plan: Plan, layers: list[VllmMoeLayer]) -> None:
    """MoE layer indices, K_orig, K_l <= K_orig (the HF backend's rule) and one expert count for all layers."""
    check_plan_fits(plan, layers)  # duck-typed: needs .index and .k_orig
    experts = {m.num_experts for m in layers}
    if len(experts) != 1:
        raise AllocMoeError(f"the model's MoE layers disagree on the number of experts: {sorted(experts)}")
    if plan.token_allocation == "alloc-t" and plan.k_base > plan.k_orig:
        raise AllocMoeError(f"plan has k_base={plan.k_base} above the model's K_orig={plan.k_orig}")


def apply_plan(model: torch.nn.Module, plan: Plan) -> list[VllmMoeLayer]:
    """Check `plan` against `model` and patch its routers (and, in the variable modes, its experts). Idempotent."""
    if getattr(model, "_alloc_moe_applied", None) is not None:
        return model._alloc_moe_applied
    layers = moe_layers(model)
    check_fits(plan, layers)
    mode = plan.token_allocation
    if mode == "topk":
        for m, k in zip(layers, plan.k_per_layer):
            m.router._alloc_moe_k_orig = m.k_orig
            m.router.top_k = int(k)
    else:
        from .experts import patch_experts

        per_sequence = mode == "alloc-t" and alloc_t_scope() == "sequence"
        if per_sequence:
            check_scope("sequence", engine_is_eager())
        for m, rule in zip(layers, core_routing.layer_rules(plan, [m.k_orig for m in layers])):
            if rule.keeps_everything:
                continue  # Alloc-T at K_orig keeps every candidate: the layer stays exactly the original one (as in HF)
            patch_experts(m)
            m.router._alloc_moe_k_orig = m.k_orig
            m.router._compute_routing = _routing_patch(m.router, m.router._compute_routing, rule, per_sequence)
    model._alloc_moe_applied = layers
    return layers


def remove_plan(model: torch.nn.Module) -> None:
    """Undo `apply_plan` (eager engines only: a compiled graph keeps what it traced)."""
    layers = getattr(model, "_alloc_moe_applied", None)
    if layers is None:
        return
    from .experts import unpatch_experts

    for m in layers:
        if hasattr(m.router, "_alloc_moe_k_orig"):
            m.router.top_k = m.router._alloc_moe_k_orig
            del m.router._alloc_moe_k_orig
        m.router.__dict__.pop("_compute_routing", None)
        unpatch_experts(m)
    del model._alloc_moe_applied
