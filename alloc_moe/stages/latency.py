"""Prefill and decode latency of plans against the original model, and the ideal speedup next to it.

Protocol (the paper's Appendix A.2): random-token prompts (seeded), batch B x prompt P; prefill = one forward over
[B, P] that builds the KV cache and returns the last position's logits (time to first token); decode = D
single-token forward steps on that cache with fixed random next tokens (the same for every plan), reported as ms
per generated token (one step = one token for each of the B sequences). W warm-up runs, then R timed runs; in every
run each label (the original and every plan) is measured once, in an order rotated by the run index, so the
speedup of a plan is taken run by run inside one process: speedup = median over runs of original_ms / plan_ms;
`speedup_min` = min over runs of original_ms / min over runs of plan_ms is reported too (on a shared machine other
work only ever adds time, so the fastest run is the least disturbed one).

Interval and resolution (`median_interval`, `resolved`): the R per-run paired ratios original_ms / plan_ms give a
distribution-free interval for their median (the sign-test / order-statistic interval: [r_(k), r_(R+1-k)] of the
sorted ratios covers the median with probability 1 - 2 P(Bin(R, 1/2) < k); k is the largest with coverage >= 95%,
or k = 1, the range, when R < 6 cannot reach 95%; `speedup_level` records the coverage reached). No resampling, so
it is deterministic given the timings. A speedup is `resolved` when its interval is narrow next to it:
(speedup_hi - speedup_lo) / speedup <= RESOLVED_REL_WIDTH (0.10, i.e. known to about +-5%); an unresolved speedup
is drawn hollow and should not be read as a result.

Ideal speedup: `f` = share of the original model's phase time spent inside the routed experts (`mlp.experts`,
timed by hooks in one extra instrumented run); shrinking only the expert GEMMs to the plan's budget (ratio
r = sum(K_l) / (L * K_orig)) could give at most 1 / ((1 - f) + f * r) (Amdahl). Shared experts, attention,
routers and the LM head are the (1 - f) part. `of_ideal` = speedup / ideal. The vllm backend times the routed-experts
kernels of the original engine in one extra run (eager engines; `backends.vllm.latency.expert_share`).

Backends are registered by name in `alloc_moe.backends.base.BACKENDS` and reached through `get_backend(name)`
(`hf`: `alloc_moe.backends.hf.latency`, `vllm`: `alloc_moe.backends.vllm.latency`). The contract a backend implements:

    Backend.measure_latency(model_path: str, plans: list[tuple[str, Plan | None]], protocol: Protocol,
                            **engine_args) -> BackendResult

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
plan taken run by run in one process on one machine state. The `hf` backend, and the `vllm` backend on eager engines,
interleave the labels inside every run, so no label is ever finished before the others; `vllm` with compiled or
CUDA-graph engines measures plan after plan (one engine each). Timings kept from a killed process would be paired
with timings of another process, possibly on another node, GPU clock or neighbour load, and the speedups would
silently mix conditions. A killed latency job is measured again as a whole.
"""

import dataclasses
import json
import math
import statistics
from pathlib import Path

import torch

from ..backends.base import BACKENDS, DTYPE_HELP, check_dtype, get_backend
from ..backends.hf.model import check_plans_fit_model_dir
from ..backends.vllm import options as vllm_options
from ..core.plan import ORIGINAL, Plan, labelled_plans
from ..errors import AllocMoeError
from ..io import atomic_path, atomic_write_text

PHASES = ("prefill", "decode")
CI_LEVEL = 0.95  # wanted coverage of the speedup interval
RESOLVED_REL_WIDTH = 0.10  # resolved: interval width <= 10% of the speedup
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
    dtype: str = "auto"  # auto: the checkpoint's own dtype, float32 when it records none (`backends.base`)
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
        check_dtype(self.dtype)
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


# ------------------------------------------------------------------------------------------------ results


def _plan_fields(plan: Plan | None, k_orig_total: float | None) -> dict:
    if plan is None:
        return {"layer_method": ORIGINAL, "token_allocation": "topk", "budget": k_orig_total}
    return {"layer_method": plan.layer_method, "token_allocation": plan.token_allocation, "budget": float(plan.budget)}


def ideal_speedup(share: float, budget_ratio: float) -> float:
    """Amdahl: only the expert part (share of the time) shrinks, by the budget ratio."""
    return 1.0 / ((1.0 - share) + share * budget_ratio)


def median_interval(values, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(lo, hi, coverage): the order-statistic interval [v_(k), v_(n+1-k)] for the median of `values` (1-based
    order statistics), with k the largest index whose coverage 1 - 2 P(Bin(n, 1/2) <= k - 1) is >= `level`; k = 1
    (the range) when no k reaches it. Distribution-free, no resampling."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        raise AllocMoeError("no runs to take an interval over")

    def coverage(k):
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return v[k - 1], v[n - k], coverage(k)


def resolved(speedup: float, lo: float, hi: float, rel_width: float = RESOLVED_REL_WIDTH) -> bool:
    """A speedup is resolved when its interval is at most `rel_width` of it wide."""
    return (hi - lo) <= rel_width * speedup


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
            ratios = [b / m for b, m in zip(base, mine)]
            lo, hi, level = median_interval(ratios)
            speedup = statistics.median(ratios)
            d = {"median_ms": statistics.median(mine), "min_ms": min(mine), "max_ms": max(mine),
                 "speedup": speedup,
                 "speedup_min": min(base) / min(mine),  # robust to interference from other work (it only adds time)
                 "speedup_lo": lo, "speedup_hi": hi, "speedup_level": level,
                 "resolved": resolved(speedup, lo, hi)}
            if result.expert_share is not None:
                d["ideal_speedup"] = ideal_speedup(result.expert_share[phase], ratio)
                d["of_ideal"] = speedup / d["ideal_speedup"]  # measured / ideal: one number per plan and phase
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
    impl = get_backend(backend)
    protocol.check()
    plans = labelled_plans(list(plan_paths))
    check_plans_fit_model_dir(model_path, plans)
    if protocol.threads:
        torch.set_num_threads(protocol.threads)
    result = impl.measure_latency(model_path, plans, protocol, **(backend_args or {}))
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
    p.add_argument("--backend", default="hf", help=f"latency backend (default hf; registered: {', '.join(BACKENDS)})")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--decode", type=int, default=128, help="decode steps (default 128)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
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
            f"{ph} {d['median_ms']:.1f} ms x{d['speedup']:.3f} [{d['speedup_lo']:.3f}, {d['speedup_hi']:.3f}]"
            + ("" if d["resolved"] else " unresolved")
            + (f" (ideal x{d['ideal_speedup']:.3f}, {d['of_ideal']:.2f} of it)" if "ideal_speedup" in d else "")
            for ph, d in e["phases"].items()))
    print(f"wrote {args.out}")
    return 0


def speedup_frame(summary: dict, model: str | None = None):
    """One row per (plan, phase) of a latency summary: method, budget, median ms, speedup, ideal speedup, and the
    speedup's interval (`speedup_lo`, `speedup_hi`, coverage `speedup_level`) and `resolved` flag (left empty for a
    summary written before the intervals existed)."""
    import pandas as pd

    rows = []
    for e in summary["plans"]:
        method = ORIGINAL if e["layer_method"] == ORIGINAL else f"{e['layer_method']}+{e['token_allocation']}"
        for phase, d in e["phases"].items():
            rows.append({"model": model or summary.get("model"), "plan": e["plan"], "method": method,
                         "layer_method": e["layer_method"], "token_allocation": e["token_allocation"],
                         "budget": e["budget"], "phase": phase, "median_ms": d["median_ms"], "speedup": d["speedup"],
                         "ideal_speedup": d.get("ideal_speedup"), "of_ideal": d.get("of_ideal"), "speedup_lo": d.get("speedup_lo"),
                         "speedup_hi": d.get("speedup_hi"), "speedup_level": d.get("speedup_level"),
                         "resolved": d.get("resolved")})
    return pd.DataFrame(rows)
