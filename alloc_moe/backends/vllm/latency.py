"""Latency through a vLLM engine with a plan (`backend.VLLMBackend.measure_latency`).

One engine per plan (plans are applied at model load, before compilation), each checked against the GPU's free
memory before it starts and torn down completely before the next (`engine.check_free_memory`, `engine.shutdown`).
Each run sends the same `batch` prompts of `prompt` random token ids twice, prefix caching off: once with 1 output
token (prefill = time to the first token of the whole batch) and once with `decode` tokens (ignore_eos); decode ms per
generated token = (full - prefill) / (decode - 1). `warmup` runs are discarded. Engine settings: `backend_args`
(`mode`, `gpu_memory_utilization`, `moe_backend` of `alloc_moe.backends.vllm.options`, or other `engine.ENGINE_ARGS`);
`record` gives their provenance, resolved as `measure` resolves them.

Expert share (for the ideal speedup, as on the hf backend): after its timed runs, the original engine gets one more
instrumented run in which every MoE layer's routed-experts kernel (`fused_experts.apply`) is timed by a wrapper
installed with `llm.apply_model` (`VLLM_ALLOW_INSECURE_SERIALIZATION=1` is set for that engine only); share = kernel
ms / phase ms. Only eager engines call the Python `apply` at every step (a compiled graph or a replayed CUDA graph
does not), so the share is None for the others.
"""

import time

import torch

from ...core.plan import Plan
from ...errors import AllocMoeError
from ..hf.loading import hub_kwargs, split_ref
from . import engine


def _prompts(model: str, batch: int, prompt: int, seed: int) -> list[list[int]]:
    """[B, P] seeded random ids below the model's vocab_size: the same prompts as the hf backend (`backends.hf.latency._inputs`)."""
    from transformers import AutoConfig

    name, revision = split_ref(model)
    vocab = int(AutoConfig.from_pretrained(name, revision=revision).vocab_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt), generator=g).tolist()


def _timed(llm, prompts, sp) -> float:
    from vllm import TokensPrompt

    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return (time.perf_counter() - t) * 1e3


def measure(model: str, plans: list[tuple[str, Plan | None]], **kw) -> list[dict]:
    """Rows {"plan", "phase": "prefill"|"decode", "run", "ms"} for every plan (label, Plan or None = original)."""
    return measure_with_share(model, plans, **kw)[0]


def _install_timer(model) -> int:
    """Wrap every MoE layer's routed-experts kernel `apply` with a timer appending (tokens, ms) per call to
    `fused_experts._alloc_moe_ms`."""
    from .experts import _fused_experts
    from .routing import moe_layers

    layers = moe_layers(model)
    for m in layers:
        fe = _fused_experts(m.runner)
        inner = fe.apply
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def timed(output, *a, _inner=inner, _fe=fe, _sync=sync, **k):
            _sync()
            t = time.perf_counter()
            out = _inner(output, *a, **k)
            _sync()
            _fe._alloc_moe_ms.append((int(output.shape[0]), (time.perf_counter() - t) * 1e3))
            return out

        fe._alloc_moe_ms = []
        fe.apply = timed
    return len(layers)


def _read_timer(model) -> list[tuple[int, float]]:
    """The (tokens, ms) kernel calls since the last read (then cleared)."""
    from .experts import _fused_experts
    from .routing import moe_layers

    calls = []
    for m in moe_layers(model):
        fe = _fused_experts(m.runner)
        calls += fe._alloc_moe_ms
        fe._alloc_moe_ms = []
    return calls


def expert_share(llm, prompts, first, full) -> dict[str, float] | None:
    """Share of each phase's time inside the routed-experts kernels, from one instrumented run (eager engines): the
    prefill run's kernel ms / its time, and the decode steps' kernel ms (calls with at most `batch` tokens) of the
    full run / (full - prefill) time, as the protocol defines decode."""
    batch = len(prompts)
    llm.apply_model(_install_timer)
    _timed(llm, prompts, first)  # the wrapper's first calls
    llm.apply_model(_read_timer)
    pre = _timed(llm, prompts, first)
    e_pre = sum(ms for calls in llm.apply_model(_read_timer) for n, ms in calls if n > batch)
    tot = _timed(llm, prompts, full)
    e_dec = sum(ms for calls in llm.apply_model(_read_timer) for n, ms in calls if n <= batch)
    if e_pre <= 0 or e_dec <= 0 or tot <= pre:  # a compiled / replayed graph never called the wrapper
        return None
    return {"prefill": min(e_pre / pre, 1.0), "decode": min(e_dec / (tot - pre), 1.0)}


def measure_with_share(model: str, plans: list[tuple[str, Plan | None]], *, batch: int, prompt: int, decode: int,
                       warmup: int, runs: int, dtype: str, seed: int,
                       **backend_args) -> tuple[list[dict], dict[str, float] | None]:
    """(`measure`'s rows, the original's expert share per phase or None)."""
    from vllm import LLM, SamplingParams

    if min(batch, prompt, runs) < 1 or decode < 2 or warmup < 0:
        raise AllocMoeError(f"latency needs batch, prompt, runs >= 1, decode >= 2, warmup >= 0; got batch={batch} "
                            f"prompt={prompt} decode={decode} warmup={warmup} runs={runs}")
    kwargs = engine_settings(model, batch=batch, dtype=dtype, seed=seed, **backend_args)
    for _, plan in plans:
        if plan is not None:
            engine.check_plan_for_model(model, plan)
    prompts = _prompts(model, batch, prompt, seed)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_tokens=decode, temperature=0.0, ignore_eos=True)
    rows, share = [], None
    eager = bool(kwargs.get("enforce_eager"))
    for label, plan in plans:
        timer = plan is None and eager
        with engine.plan_env(plan, {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"} if timer else None):
            name, revision = hub_kwargs(model)  # org/name@revision: the revision reaches the engine and the tokenizer
            free = engine.check_free_memory(kwargs)
            llm = LLM(model=name, enable_prefix_caching=False, **revision, **kwargs)
            try:
                for i in range(warmup + runs):
                    pre = _timed(llm, prompts, first)
                    tot = _timed(llm, prompts, full)
                    if i >= warmup:
                        rows.append({"plan": label, "phase": "prefill", "run": i - warmup, "ms": pre})
                        rows.append({"plan": label, "phase": "decode", "run": i - warmup,
                                     "ms": (tot - pre) / (decode - 1)})
                if timer:
                    share = expert_share(llm, prompts, first, full)
            finally:
                engine.shutdown(llm, wait_for=free)
                del llm
    return rows, share


def engine_settings(model: str | None, *, batch: int | None = None, dtype: str = "float32", seed: int = 0,
                    **backend_args) -> dict:
    """LLM(...) arguments of a latency engine: `engine.engine_kwargs` with `max_num_seqs` = batch (all prompts of a
    run share the engine's steps) and the backend arguments (`mode` among them)."""
    sched = {"max_num_seqs": max(batch, 1)} if batch is not None else {}
    mode = backend_args.pop("mode", None) or "auto"
    return engine.engine_kwargs(dtype=dtype, seed=seed, model=model, mode=mode, **{**sched, **backend_args})


def record(model: str | None = None, *, batch: int | None = None, dtype: str = "float32", seed: int = 0,
           **backend_args) -> dict:
    """Provenance for latency results of this backend (vLLM version, scheduler settings, compile mode, memory share,
    MoE backend, the model's engine args), resolved as `measure` resolves them."""
    kwargs = engine_settings(model, batch=batch, dtype=dtype, seed=seed, **backend_args)
    return engine.engine_record(kwargs, mode=backend_args.get("mode") or "auto")
