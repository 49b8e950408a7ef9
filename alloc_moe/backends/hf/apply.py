"""Apply a plan to a Hugging Face transformers MoE model with real compute savings.

transformers 5.x MoE blocks (`model.model.layers[i].mlp`) call `gate(hidden) -> (logits [T,E], weights [T,K],
index [T,K])` and then `experts(hidden, index, weights)`. Two patch points, neither touching parameters:

- top-k mode: the router reads `gate.top_k` at every forward, so we set it to K_l. The experts then get [T, K_l]
  slots: T*K_l rows are computed, in every experts implementation, and routing is the model's own.
- alloc-t / top-p / naee: a forward hook on `gate` keeps the router's K_orig slots in place and marks dropped pairs
  with the sentinel id `num_experts` and weight 0 (`routing.drop_pairs`, shared with the vLLM backend). The `eager`
  experts skip the sentinel expert; `grouped_mm` sorts
  sentinels to the tail and computes only rows below the last offset (`_is_expert_parallel = True` makes it zero
  those tail rows instead of leaving them uninitialised). On CPU the grouped_mm experts are replaced by
  `experts.kept_pairs_forward`, which gathers, activates and weights only the kept rows (bit-identical output).
  `batched_mm` computes every slot whatever we do.
  Slots are never reordered, so keeping every pair reproduces the unpatched model bit for bit.
"""

import warnings

import torch

from ...core import routing
from ...core.plan import Plan, as_plan
from ...core.routing import LayerRule
from ...errors import AllocMoeError
from . import experts as kept_pairs_experts
from .model import ARCHITECTURES, MoeLayer, check_plan_fits, moe_layers  # noqa: F401 - re-exported
from .stats import RoutingStats


class _TokenMask:
    """Which of the T flattened tokens of the current forward are real (from the 2-D attention mask)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def capture(self, module, args, kwargs):
        am = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if isinstance(am, torch.Tensor) and am.dim() == 2 and ids is not None:
            S = ids.shape[1]
            self.mask = am[:, -S:].reshape(-1).bool()  # [B*S]
        else:
            self.mask = None

    def get(self, T: int) -> torch.Tensor | None:
        m = self.mask
        return m if m is not None and m.numel() == T else None


class AppliedPlan:
    """Handle returned by `apply`: `.remove()` (or leaving the `with` block) restores the model exactly."""

    def __init__(self, model, plan: Plan | None, layers: list[MoeLayer], stats: RoutingStats | None):
        self.model, self.plan, self.layers, self.stats = model, plan, layers, stats
        self._handles: list = []
        self._restore: list[tuple[object, str, object]] = []
        self._token_mask = _TokenMask()
        self._removed = False

    def _set(self, obj, name, value):
        self._restore.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def remove(self) -> None:
        if self._removed:
            return
        for h in self._handles:
            h.remove()
        for obj, name, value in reversed(self._restore):
            setattr(obj, name, value)
        for m in self.layers:
            if hasattr(m.gate, "_alloc_moe_k_orig"):
                del m.gate._alloc_moe_k_orig
        del self.model._alloc_moe_applied
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _router_hook(m: MoeLayer, rule: LayerRule, token_mask: _TokenMask):
    def hook(gate, args, output):
        logits, weights, index = output  # [T, E], [T, K], [T, K]
        mask = token_mask.get(index.shape[0]) if rule.uses_token_mask else None
        new_w, new_index = routing.drop_pairs(logits, weights, index, rule, sentinel=m.num_experts,
                                              renormalize=m.renormalize, token_mask=mask)
        return logits, new_w, new_index

    return hook


def apply(model, plan: "Plan | str | dict | None", *, stats: RoutingStats | bool | None = None) -> AppliedPlan:
    """Patch `model` to follow `plan` (a Plan, a path to a plan JSON, or None for statistics only).

    The plan is checked against the model before anything is patched. Use as a context manager or call `.remove()`.
    `stats=True` (or a RoutingStats) records what the experts actually computed; it costs a few small tensor ops
    per layer and no host synchronisation.
    """
    if getattr(model, "_alloc_moe_applied", False):
        raise AllocMoeError("a plan is already applied to this model; call .remove() on its handle first")
    plan = as_plan(plan) if plan is not None else None
    layers = moe_layers(model)
    if plan is not None:
        check_plan_fits(plan, layers)
    if stats is True:
        stats = RoutingStats()
    handle = AppliedPlan(model, plan, layers, stats or None)
    model._alloc_moe_applied = True
    for m in layers:
        m.gate._alloc_moe_k_orig = m.k_orig
    impl = getattr(model.config, "_experts_implementation", None)
    try:
        if plan is not None:
            _patch(handle, plan, layers, impl)
        if handle.stats is not None:
            _attach_stats(handle, layers)
    except BaseException:
        handle.remove()
        raise
    return handle


def _patch(handle: AppliedPlan, plan: Plan, layers: list[MoeLayer], impl) -> None:
    mode = plan.token_allocation
    if mode == "topk":
        for m, k in zip(layers, plan.k_per_layer):
            if int(k) != m.k_orig:
                handle._set(m.gate, "top_k", int(k))
        return
    if impl == "batched_mm":
        warnings.warn("experts_implementation='batched_mm' computes every slot: dropped pairs are zero-weighted but "
                      "not skipped, so there is no compute saving (use 'grouped_mm' or 'eager')", stacklevel=3)
    rules = routing.layer_rules(plan, [m.k_orig for m in layers])
    if mode == "alloc-t":  # which of the flattened tokens are padding, for the rules that spend a budget
        base = getattr(handle.model, "model", handle.model)
        handle._handles.append(base.register_forward_pre_hook(handle._token_mask.capture, with_kwargs=True))
    for m, rule in zip(layers, rules):  # at K_orig (keeps_everything) the hook runs and keeps all: bit-exact
        handle._handles.append(m.gate.register_forward_hook(_router_hook(m, rule, handle._token_mask)))
        handle._set(m.experts, "_is_expert_parallel", True)
        handle._handles.append(_InstanceForward(m.experts, kept_pairs_experts.make_forward(m.experts)))


class _InstanceForward:
    """`module.forward` replaced on the instance; `.remove()` deletes it (the class's forward shows again)."""

    def __init__(self, module, forward):
        self.module = module
        module.forward = forward

    def remove(self):
        self.module.__dict__.pop("forward", None)


def _attach_stats(handle: AppliedPlan, layers: list[MoeLayer]) -> None:
    st = handle.stats
    for m in layers:
        def on_router(gate, args, output, m=m):
            st.observe_router(m.index, output[0], m.k_orig)

        def on_experts(experts, args, kwargs, m=m):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
            st.observe_experts(m.index, index, m.num_experts, m.k_orig, weights)

        # registered after the allocation hook, so the router hook sees the final routing
        handle._handles.append(m.gate.register_forward_hook(on_router))
        handle._handles.append(m.experts.register_forward_pre_hook(on_experts, with_kwargs=True))


class ExpertRowCounter:
    """Counts the rows that actually enter each MoE layer's expert up-projection GEMMs, by intercepting the
    matrix-multiply calls themselves (`F.linear` in `eager`, `grouped_mm` in `grouped_mm`; rows past the last
    offset are skipped by the kernel). An independent check that dropped pairs cost nothing.
    """

    def __init__(self, model):
        self._by_storage = {m.experts.gate_up_proj.untyped_storage().data_ptr(): m.index for m in moe_layers(model)}
        self.rows: dict[int, int] = {}

    def __enter__(self):
        counter = self

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if name in ("linear", "grouped_mm", "_grouped_mm") and len(args) >= 2:
                    layer = counter._by_storage.get(args[1].untyped_storage().data_ptr())
                    if layer is not None:
                        if name == "linear":
                            n = args[0].shape[0]
                        else:
                            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
                            n = int(offs[-1])
                        counter.rows[layer] = counter.rows.get(layer, 0) + n
                return func(*args, **kwargs)

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
