"""Latency through a vLLM engine with a plan (`backend.VLLMBackend.measure_latency`).

Eager engines (the CPU build's default): one engine for all plans, the plans interleaved run by run in an order
rotated by the run index, as the hf backend does, so that a drift of the machine's speed during the measurement
falls on every plan alike. Before each timed pair of calls the engine's model gets the plan with `swap_plan`
(`routing.remove_plan`, then `routing.apply_plan`: the function the plugin calls at load), through `llm.apply_model`
(`VLLM_ALLOW_INSECURE_SERIALIZATION=1` is set for that engine only), and the layers' state it reports is checked
against the plan. Compiled or CUDA-graph engines keep what they traced, so there it is one engine per plan (plans
applied at model load by the plugin, before compilation), plan after plan, each checked against the GPU's free
memory before it starts and torn down completely before the next (`engine.check_free_memory`, `engine.shutdown`).

Each run sends the same `batch` prompts of `prompt` random token ids twice, prefix caching off: once with 1 output
token (prefill = time to the first token of the whole batch) and once with `decode` tokens (ignore_eos); decode ms per
generated token = (full - prefill) / (decode - 1). Every engine first serves one untimed full request (its start-up
costs would otherwise fall on the first run, and with `warmup: 0` made decode ms negative); a run whose full request
is not slower than its prefill request stops the measurement with one line. `warmup` runs are discarded. Engine
settings: `backend_args` (`mode`, `gpu_memory_utilization`, `moe_backend` of `alloc_moe.backends.vllm.options`, or
other `engine.ENGINE_ARGS`); `record` gives their provenance, resolved as `measure` resolves them.

Expert share (for the ideal speedup, as on the hf backend): after the timed runs, the original gets one more
instrumented run in which every MoE layer's routed-experts kernel (`fused_experts.apply`) is timed by a wrapper
installed with `llm.apply_model`; share = kernel ms / phase ms. Only eager engines call the Python `apply` at every
step (a compiled graph or a replayed CUDA graph does not), so the share is None for the others.
"""

import contextlib
import functools
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


def swap_plan(model, plan: Plan | None) -> list[tuple[int, int, bool]]:
    """Give a loaded eager model `plan` (None = the original): `routing.remove_plan`, then `routing.apply_plan`.
    Returns each MoE layer's (router top_k, K_orig, routing patched) for the caller to check."""
    from .routing import apply_plan, moe_layers, remove_plan

    remove_plan(model)
    if plan is not None:
        apply_plan(model, plan)
    return [(int(m.router.top_k), m.k_orig, "_compute_routing" in m.router.__dict__) for m in moe_layers(model)]


def _expected_state(plan: Plan | None, k_orig: list[int]) -> list[tuple[int, int, bool]]:
    """What `swap_plan` must report for `plan` on layers of these K_orig (top-k: the router's top_k is K_l; the
    variable modes: the router keeps K_orig and its routing is wrapped, but where the layer keeps everything)."""
    from ...core import routing as core_routing

    if plan is None:
        return [(k, k, False) for k in k_orig]
    if plan.token_allocation == "topk":
        return [(int(k), ko, False) for k, ko in zip(plan.k_per_layer, k_orig)]
    return [(ko, ko, not rule.keeps_everything) for ko, rule in zip(k_orig, core_routing.layer_rules(plan, k_orig))]


def _decode_ms(pre: float, tot: float, decode: int, label: str) -> float:
    if tot <= pre:
        raise AllocMoeError(f"latency of {label!r}: the {decode}-token request took {tot:.1f} ms, no more than the "
                            f"1-token one ({pre:.1f} ms), so decode time is not measurable; raise decode or warmup, "
                            "or measure on a quieter machine")
    return (tot - pre) / (decode - 1)


def _run(llm, prompts, first, full, decode, label) -> tuple[float, float]:
    """(prefill ms, decode ms per token) of one run."""
    pre = _timed(llm, prompts, first)
    tot = _timed(llm, prompts, full)
    return pre, _decode_ms(pre, tot, decode, label)


def interleaves(kwargs: dict) -> bool:
    """Whether `measure` times all plans in one engine, interleaved (eager engines), or one engine per plan."""
    return bool(kwargs.get("enforce_eager"))


def measure_with_share(model: str, plans: list[tuple[str, Plan | None]], *, batch: int, prompt: int, decode: int,
                       warmup: int, runs: int, dtype: str, seed: int,
                       **backend_args) -> tuple[list[dict], dict[str, float] | None]:
    """(`measure`'s rows, the original's expert share per phase or None)."""
    from vllm import SamplingParams

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
    calls = (prompts, first, full, decode)
    if interleaves(kwargs):
        return _measure_interleaved(model, plans, kwargs, calls, warmup, runs)
    rows = []
    for label, plan in plans:
        with _engine(model, kwargs, plan, calls) as llm:
            for i in range(warmup + runs):
                pre, dec = _run(llm, *calls, label)
                if i >= warmup:
                    rows += _rows(label, i - warmup, pre, dec)
    return rows, None  # compiled / CUDA-graph engines: no Python call per step to time the experts in


def _rows(label, run, pre, dec) -> list[dict]:
    return [{"plan": label, "phase": "prefill", "run": run, "ms": pre},
            {"plan": label, "phase": "decode", "run": run, "ms": dec}]


def _measure_interleaved(model, plans, kwargs, calls, warmup, runs):
    """One eager engine; in run i the plans in the order rotated by i, each swapped in (`swap_plan`) right before
    its two calls. Rows in `measure`'s order (plan by plan, run by run)."""
    from .compat import check_supported

    if any(plan is not None for _, plan in plans):
        check_supported()  # what the plugin checks before it applies a plan at load (the scope: engine_kwargs)
    rows: dict[str, list[dict]] = {label: [] for label, _ in plans}
    with _engine(model, kwargs, None, calls, serialize=True) as llm:
        k_orig = [int(x[1]) for x in llm.apply_model(functools.partial(swap_plan, plan=None))[0]]
        for i in range(warmup + runs):
            shift = i % len(plans)
            for label, plan in plans[shift:] + plans[:shift]:  # rotate the order: no label always goes first
                state = llm.apply_model(functools.partial(swap_plan, plan=plan))
                want = _expected_state(plan, k_orig)
                if any([tuple(x) for x in s] != want for s in state):  # (a transport may turn tuples into lists)
                    raise AllocMoeError(f"plan {label!r} did not take effect in the engine: layers report {state[0]} "
                                        f"(top_k, K_orig, routing patched), expected {want}")
                pre, dec = _run(llm, *calls, label)
                if i >= warmup:
                    rows[label] += _rows(label, i - warmup, pre, dec)
        share = None
        if any(plan is None for _, plan in plans):
            llm.apply_model(functools.partial(swap_plan, plan=None))
            share = expert_share(llm, *calls[:3])
    return [r for label, _ in plans for r in sorted(rows[label], key=lambda r: r["run"])], share


@contextlib.contextmanager
def _engine(model, kwargs, plan, calls, serialize=False):
    """A started engine (plan applied at load by the plugin; `serialize`: `llm.apply_model` allowed) that has served
    one untimed full request; torn down completely on exit."""
    from vllm import LLM

    with engine.plan_env(plan, {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"} if serialize else None):
        name, revision = hub_kwargs(model)  # org/name@revision: the revision reaches the engine and the tokenizer
        free = engine.check_free_memory(kwargs)
        llm = LLM(model=name, enable_prefix_caching=False, **revision, **kwargs)
        try:
            _timed(llm, calls[0], calls[2])  # start-up costs (first allocations, first kernel calls): not timed
            yield llm
        finally:
            engine.shutdown(llm, wait_for=free)
            del llm


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
    MoE backend, the model's engine args, whether the plans were interleaved in one engine), resolved as `measure`
    resolves them."""
    kwargs = engine_settings(model, batch=batch, dtype=dtype, seed=seed, **backend_args)
    rec = engine.engine_record(kwargs, mode=backend_args.get("mode") or "auto")
    rec["plans_timed"] = "interleaved in one engine" if interleaves(kwargs) else "one engine per plan"
    return rec
