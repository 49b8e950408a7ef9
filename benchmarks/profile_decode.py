"""Where a decode step's time goes: torch.profiler self-CPU time by operator group, original vs half-budget
Uniform top-k vs Uniform + Alloc-T, on DeepSeek-V2-Lite real widths (bf16, CPU).

    python benchmarks/profile_decode.py [--layers 3] [--steps 3] [--threads 2]

Groups: expert GEMMs (`mm` inside `_grouped_mm`), other matmuls, the Alloc-T routing ops (inside the router hook's
`alloc_t_slots`, recorded with `record_function`), everything else. Prints one markdown table.
"""

import argparse

import torch

from alloc_moe import build_plan
from alloc_moe.backends.hf.apply import apply, moe_layers
from alloc_moe.core import token_alloc
from alloc_moe.data.zoo import make_model
from alloc_moe.stages.latency import Protocol, _inputs


def _traced_alloc_t(fn):
    def wrapper(*a, **k):
        with torch.profiler.record_function("alloc_t_routing"):
            return fn(*a, **k)
    return wrapper


def profile(model, plan, prompt, steps) -> dict[str, float]:
    with apply(model, plan) if plan is not None else _null(), torch.inference_mode():
        cache = model(input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values
        with torch.profiler.profile() as prof:
            for ids in steps:
                cache = model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values
    groups = {"total": 0.0, "grouped_mm (experts)": 0.0, "alloc_t_routing": 0.0}
    for ev in prof.key_averages():
        if ev.key == "aten::_grouped_mm":
            groups["grouped_mm (experts)"] += ev.cpu_time_total
        if ev.key == "alloc_t_routing":
            groups["alloc_t_routing"] += ev.cpu_time_total
        groups["total"] += ev.self_cpu_time_total
    return {k: v / 1e3 / len(steps) for k, v in groups.items()}  # ms per step


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    token_alloc.TOKEN_METHODS["alloc-t"] = _traced_alloc_t(token_alloc.alloc_t_slots)
    model = make_model(topology="deepseek-v2-lite", width="full", layers=args.layers, dtype=torch.bfloat16, seed=0)
    layers = moe_layers(model)
    idx, K = [m.index for m in layers], layers[0].k_orig
    prompt, steps = _inputs(model, Protocol(decode=args.steps), torch.device("cpu"))
    plans = {"original": None}
    for token in ("topk", "alloc-t"):
        plans[f"uniform+{token}"] = build_plan(method="uniform", budget=len(idx) * K / 2, moe_layers=idx, k_orig=K,
                                               token_allocation=token)
    print(f"# decode step profile: DeepSeek-V2-Lite real widths, {len(idx)} MoE layers, bf16, {args.threads} threads "
          f"(ms per step, torch.profiler CPU time)\n")
    print("| plan | total | grouped_mm (experts) | Alloc-T routing |")
    print("|---|---:|---:|---:|")
    for label, plan in plans.items():
        g = profile(model, plan, prompt, steps)
        print(f"| {label} | {g['total']:.1f} | {g['grouped_mm (experts)']:.1f} | {g['alloc_t_routing']:.2f} |")


if __name__ == "__main__":
    main()
