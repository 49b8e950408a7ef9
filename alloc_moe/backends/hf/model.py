"""Where a transformers MoE model keeps its sparse blocks: MoE-layer discovery and the plan-vs-model check.

Model structure only (no plan application), so code that needs to find the MoE layers (training, the zoo,
profiling) does not depend on how plans are applied (`hf_backend`).
"""

import dataclasses
from collections.abc import Callable

import torch

from ...errors import AllocMoeError


def _norm_topk(gate) -> bool:
    return bool(getattr(gate, "norm_topk_prob", False))


# model_type -> does the router renormalise the kept top-k weights? (one entry per supported architecture)
ARCHITECTURES: dict[str, Callable[[torch.nn.Module], bool]] = {
    "deepseek_v2": lambda gate: False,  # multiplies by routed_scaling_factor instead
    "qwen2_moe": _norm_topk,
    "olmoe": _norm_topk,
    "qwen3_moe": _norm_topk,
    "mixtral": lambda gate: True,
}


@dataclasses.dataclass
class MoeLayer:
    index: int  # decoder-layer index
    block: torch.nn.Module
    gate: torch.nn.Module
    experts: torch.nn.Module
    num_experts: int
    k_orig: int
    renormalize: bool


def _decoder_layers(model) -> torch.nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise AllocMoeError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return layers


def moe_layers(model) -> list[MoeLayer]:
    """The model's sparse MoE blocks, in depth order (dense layers skipped)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise AllocMoeError(f"unsupported model type {model_type!r}; supported: {', '.join(ARCHITECTURES)}")
    out = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if gate is None or experts is None or not hasattr(gate, "top_k"):
            continue
        k = getattr(gate, "_alloc_moe_k_orig", gate.top_k)
        out.append(MoeLayer(i, block, gate, experts, experts.num_experts, int(k), ARCHITECTURES[model_type](gate)))
    if not out:
        raise AllocMoeError(f"{type(model).__name__} has no MoE layers")
    return out


def check_plan_fits(plan, layers: list[MoeLayer]) -> None:
    """A one-line error if `plan` (an `alloc_moe.Plan`) does not fit these MoE layers."""
    indices = [m.index for m in layers]
    if plan.moe_layers != indices:
        raise AllocMoeError(
            f"plan is for MoE layers {_span(plan.moe_layers)} but the model's MoE layers are {_span(indices)}"
        )
    k_orig = {m.k_orig for m in layers}
    if k_orig != {plan.k_orig}:
        raise AllocMoeError(f"plan has k_orig={plan.k_orig} but the model's routers use top-k {sorted(k_orig)}")
    for m, k in zip(layers, plan.k_per_layer):
        if k > m.k_orig:
            raise AllocMoeError(f"plan gives layer {m.index} K={k}, above the model's K_orig={m.k_orig}")


def config_moe_layers(model_path: str) -> list[MoeLayer] | None:
    """The MoE layers of `model_path` (a directory, or a hub id (@revision, `loading.split_ref`) whose config is cached)
    from a parameter-free (meta device) copy built from its config; None for a hub id whose config cannot be read here."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import split_ref

    name, revision = split_ref(model_path)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if not os.path.isdir(model_path):
            return None
        raise AllocMoeError(f"cannot read the model config in {model_path}: {str(e).strip().splitlines()[0]}") from None
    with torch.device("meta"):
        return moe_layers(AutoModelForCausalLM.from_config(config, trust_remote_code=False))


def check_plans_fit_model_dir(model_path: str, plans: list[tuple[str, "Plan | None"]]) -> None:  # noqa: F821
    """Every (label, plan) fits the model `model_path`, checked on `config_moe_layers`, so a wrong plan fails before
    any weight is loaded. A hub id whose config cannot be read here is skipped (`apply` checks after loading)."""
    if not any(plan is not None for _, plan in plans):
        return
    layers = config_moe_layers(model_path)
    if layers is None:
        return
    for label, plan in plans:
        if plan is not None:
            try:
                check_plan_fits(plan, layers)
            except AllocMoeError as e:
                raise AllocMoeError(f"plan {label} does not fit {model_path}: {e}") from None


def _span(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]} ({len(xs)} layers)" if xs == list(range(xs[0], xs[-1] + 1)) else str(xs)
