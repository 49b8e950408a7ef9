"""vLLM general plugin (entry point group `vllm.general_plugins`): apply the plan named by `ALLOC_MOE_PLAN`.

vLLM loads general plugins in every process it starts (main, engine core, workers), before building the model.
With `ALLOC_MOE_PLAN` unset or empty, `register` does nothing and vLLM is untouched. Otherwise it checks the installed
vLLM (`compat.check_supported`: the hooks and kernels the backend patches) and the plan file (either failing stops
the engine at start-up, in the main process, with one line) and wraps `BaseModelLoader.load_model`, the
point every model runner goes through: right after the weights are loaded and processed, and before torch.compile
or CUDA-graph capture, the plan is checked against the model (MoE layer indices, experts, K_orig) and applied.
Idempotent: registering twice, or loading the same model object twice, patches once.
"""

import functools
import logging
import os

from ...core.plan import Plan
from ...errors import AllocMoeError

PLAN_ENV = "ALLOC_MOE_PLAN"
logger = logging.getLogger("alloc_moe.vllm")


def plan_from_env() -> Plan | None:
    path = os.environ.get(PLAN_ENV, "").strip()
    return Plan.load(path) if path else None


def register() -> None:
    plan = plan_from_env()
    if plan is None:
        return
    from .compat import check_supported
    from .routing import alloc_t_scope

    check_supported()  # an unsupported vLLM stops here, in the main process, before any engine starts
    alloc_t_scope()  # a bad scope fails here too, not at the first forward
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if getattr(BaseModelLoader.load_model, "_alloc_moe", False):
        return
    BaseModelLoader.load_model = _wrap(BaseModelLoader.load_model)
    for cls in _subclasses(BaseModelLoader):  # loaders that override load_model (tensorizer, ...) too
        if "load_model" in vars(cls) and not getattr(cls.load_model, "_alloc_moe", False):
            cls.load_model = _wrap(cls.load_model)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _wrap(load_model):
    @functools.wraps(load_model)
    def wrapped(self, *args, **kwargs):
        model = load_model(self, *args, **kwargs)
        _apply_from_env(model)
        return model

    wrapped._alloc_moe = True
    return wrapped


def _apply_from_env(model) -> None:
    from .routing import apply_plan

    plan = plan_from_env()
    if plan is None:
        return
    try:
        layers = apply_plan(model, plan)
    except AllocMoeError as e:
        logger.error("alloc_moe: %s", e)
        raise
    logger.info("alloc_moe: applied %s plan (%s x %s, K per layer %s) to %d MoE layers", os.environ[PLAN_ENV],
                plan.layer_method, plan.token_allocation, plan.k_per_layer, len(layers))
