"""Prefill/decode speedups of half-budget plans on DeepSeek-V2-Lite real widths (a few MoE layers), CPU, bf16.

    python benchmarks/bench_latency.py [--layers 3] [--decode 6] [--warmup 1] [--runs 4] [--threads 2] [--out FILE.md]

Builds the zoo model `deepseek-v2-lite --width full` in memory (random weights, default router init), makes the
half-budget plans Uniform top-k, Alloc-L top-k (Algorithm 1 sensitivity on a small synthetic calibration set),
Uniform + Alloc-T and Alloc-L + Alloc-T (k_base 1), and measures them against the original with
`alloc_moe.backends.hf.latency.measure_hf`, interleaved run by run (batch 8, prompt 32). Speedups are taken on the fastest run of each label (the machine is
shared: other work only adds time), with the median of per-run ratios next to them. Prints a markdown report: each plan's
speedup next to the ideal (Amdahl on the measured expert share) and the paper's 1.15x / 1.34x, and the goal
check: every plan's decode speedup >= 0.95 x Uniform top-k's.
"""

import argparse
import json

import torch

from alloc_moe import build_plan
from alloc_moe.backends.hf.apply import moe_layers
from alloc_moe.data.synthetic import make_corpus
from alloc_moe.data.text import load_calibration, tokenize_windows
from alloc_moe.data.zoo import make_model, make_tokenizer
from alloc_moe.harness.provenance import environment
from alloc_moe.io import atomic_write_text
from alloc_moe.backends.hf.latency import measure_hf
from alloc_moe.stages.latency import Protocol, summarize, write_rows
from alloc_moe.stages.profile import profile_perplexity

PAPER = {"prefill": 1.15, "decode": 1.34}  # DeepSeek-V2-Lite, B = 78 of 156, H100, vLLM


def sensitivity(model, windows: int, seq_len: int):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "calib.jsonl"
        path.write_text("".join(json.dumps(doc) + "\n" for doc in make_corpus(seed=1, docs_per_family=10)))
        docs = load_calibration(str(path))
    ids = tokenize_windows(docs, make_tokenizer(), seq_len=seq_len, max_tokens=windows * seq_len).input_ids
    return profile_perplexity(model, ids, batch_size=windows, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3, help="decoder layers (layer 0 is dense; default 3 = 2 MoE layers)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the report (markdown) here")
    ap.add_argument("--csv", default=None, help="also write the per-run rows (latency CSV) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = make_model(topology="deepseek-v2-lite", width="full", layers=args.layers, dtype=torch.bfloat16, seed=0)
    layers = moe_layers(model)
    idx, K = [m.index for m in layers], layers[0].k_orig
    budget = len(idx) * K / 2
    _, S = sensitivity(model, args.calib_windows, seq_len=32)
    plans = [("original", None)]
    for layer, token, label in (("uniform", "topk", "Uniform top-k"), ("alloc-l", "topk", "Alloc-L"),
                                ("uniform", "alloc-t", "Alloc-T"), ("alloc-l", "alloc-t", "Alloc-L+T")):
        plans.append((label, build_plan(method=layer, budget=budget, moe_layers=idx, k_orig=K, sensitivity=S,
                                        token_allocation=token, exact_budget=True, model="deepseek-v2-lite full")))
    protocol = Protocol(batch=args.batch, prompt=args.prompt, decode=args.decode, warmup=args.warmup, runs=args.runs,
                        threads=args.threads)
    result = measure_hf(model, plans, protocol)
    rows, s = summarize(result, plans)
    if args.csv:
        write_rows(rows, args.csv)
    by = {e["plan"]: e for e in s["plans"]}
    ref = by["Uniform top-k"]["phases"]["decode"]["speedup_min"]

    lines = [f"# Latency: DeepSeek-V2-Lite real widths, {args.layers} decoder layers ({len(idx)} MoE: "
             f"64 experts, top-{K}), bf16, {args.threads} threads, {result.device}",
             "",
             f"Command: `python benchmarks/bench_latency.py --layers {args.layers} --decode {args.decode} "
             f"--warmup {args.warmup} --runs {args.runs} --threads {args.threads}`  ",
             f"Protocol: batch {args.batch}, prompt {args.prompt}, {args.decode} decode steps, {args.warmup} warm-up + "
             f"{args.runs} runs, interleaved in rotating order; ms = fastest run; speedup = fastest original run / fastest plan "
             f"run (median of the per-run ratios in brackets). "
             f"Half budget B = {budget:g} of {len(idx) * K}. Expert share of the original model's time: "
             f"prefill {s['expert_share']['prefill']:.2f}, decode {s['expert_share']['decode']:.2f}.",
             "",
             "| plan | K per layer | prefill ms | prefill speedup | ideal | decode ms/step | decode speedup | ideal "
             "| decode speedup / Uniform top-k's |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, plan in plans:
        e = by[label]
        pf, dc = e["phases"]["prefill"], e["phases"]["decode"]
        ks = "original" if plan is None else ", ".join(f"{k:g}" for k in plan.k_per_layer)
        rel = "" if plan is None else f"{dc['speedup_min'] / ref:.3f}"
        lines.append(f"| {label} | {ks} | {pf['min_ms']:.0f} | {pf['speedup_min']:.3f} ({pf['speedup']:.3f}) | "
                     f"{pf['ideal_speedup']:.3f} | {dc['min_ms']:.0f} | {dc['speedup_min']:.3f} ({dc['speedup']:.3f}) | "
                     f"{dc['ideal_speedup']:.3f} | {rel} |")
    lines.append(f"| paper (Alloc-MoE, 26 MoE layers, H100, vLLM) | B = 78 of 156 | | {PAPER['prefill']:.2f} | | | "
                 f"{PAPER['decode']:.2f} | | |")
    worst = min(by[lab]["phases"]["decode"]["speedup_min"] / ref for lab, p in plans if p is not None)
    lines += ["", f"Goal (every half-budget plan's decode speedup >= 0.95 x Uniform top-k's): worst {worst:.3f} -> "
              f"{'met' if worst >= 0.95 else 'NOT met'}.", "", "```json", json.dumps(environment(), indent=1), "```"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        atomic_write_text(args.out, report)


if __name__ == "__main__":
    main()
