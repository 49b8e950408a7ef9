"""Alloc-T against top-k at the same half budget, both backends, with the ideal next to every speedup (issue 19).

    python benchmarks/bench_alloc_t_decode.py [--topologies deepseek-v2-lite,qwen1.5-moe-a2.7b,olmoe-1b-7b-0924]
        [--backends hf,vllm] [--layers 3] [--batch 8] [--prompt 32] [--decode 32] [--warmup 1] [--runs 3]
        [--threads 2] [--out-dir results/benchmarks] [--name alloc-t-decode] [--profile]

Run it with the vLLM venv (it has both stacks): `.venv-vllm/bin/python benchmarks/bench_alloc_t_decode.py`.
For every paper topology (zoo, full width, `--layers` decoder layers, random weights, bf16) it measures the original,
Uniform top-k and Uniform + Alloc-T (k_base 1) at half budget with the latency stage's protocol
(`alloc_moe.stages.latency`: batch x prompt, decode steps, warm-up + runs) on each backend: `hf`
(`backends.hf.latency.measure_hf`, labels interleaved run by run; a fourth label, "Alloc-T (sentinel slots)", is
Alloc-T with transformers' own grouped_mm sentinel path instead of `backends.hf.experts.kept_pairs_forward`: the
before of this change, measured in the same runs) and `vllm` (the CPU build, eager: one engine, the plans swapped in
and interleaved run by run, as on hf; `backends.vllm.latency`). Each speedup (median of per-run ratios to the original, with min-max over runs) stands next to its ideal
(Amdahl on the measured expert share) and `of_ideal` = speedup / ideal; `vs_topk` = Alloc-T's speedup / top-k's.

Writes `<out-dir>/<name>.csv` (one row per topology, backend, plan, phase), `<name>.png` (seaborn: measured and
ideal speedups), `<name>.md` (the table, command and environment) atomically, and prints the table.
`--profile` prints where the time of an HF prefill and decode step goes (torch.profiler: router hook `drop_pairs`,
experts module, its grouped GEMMs, the rest of the experts module = gather / sentinel handling / scatter) and exits.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOPOLOGIES = ("deepseek-v2-lite", "qwen1.5-moe-a2.7b", "olmoe-1b-7b-0924")
SENTINEL = "Alloc-T (sentinel slots)"


def half_budget_plans(layers, with_sentinel: bool):
    from alloc_moe import build_plan

    idx, K = [m.index for m in layers], layers[0].k_orig
    kw = dict(method="uniform", budget=len(idx) * K / 2, moe_layers=idx, k_orig=K, exact_budget=True)
    plans = [("original", None), ("Uniform top-k", build_plan(token_allocation="topk", **kw)),
             ("Uniform + Alloc-T", build_plan(token_allocation="alloc-t", **kw))]
    if with_sentinel:
        plans.append((SENTINEL, build_plan(token_allocation="alloc-t", **kw)))
    return plans


def _sentinel_apply(plans):
    """`hf.apply.apply` that, for the SENTINEL plan object, leaves transformers' grouped_mm (sentinel slots) in place."""
    from alloc_moe.backends.hf import apply as hf_apply

    baseline = dict(plans).get(SENTINEL)
    original = hf_apply.apply

    def apply(model, plan, **kw):
        handle = original(model, plan, **kw)
        if plan is not None and plan is baseline:
            for m in handle.layers:
                m.experts.__dict__.pop("forward", None)
        return handle

    return original, apply


def measure_hf(model, plans, protocol):
    from alloc_moe.backends.hf import apply as hf_apply
    from alloc_moe.backends.hf.latency import measure_hf as run

    original, patched = _sentinel_apply(plans)
    hf_apply.apply = patched
    try:
        return run(model, plans, protocol)
    finally:
        hf_apply.apply = original


def measure_vllm(model_dir, plans, protocol):
    from alloc_moe.backends.base import get_backend

    return get_backend("vllm").measure_latency(str(model_dir), plans, protocol, mode="eager")


def table_rows(topology, backend, result, plans, summary) -> list[dict]:
    """One row per plan and phase: speedup (median, min-max over runs), ideal, of_ideal, vs top-k."""
    ms = {(r["plan"], r["phase"], r["run"]): r["ms"] for r in result.rows}
    runs = sorted({r["run"] for r in result.rows})
    by = {e["plan"]: e for e in summary["plans"]}
    out = []
    for label, _ in plans:
        for phase in ("prefill", "decode"):
            d = by[label]["phases"][phase]
            per_run = [ms["original", phase, r] / ms[label, phase, r] for r in runs]
            vs = [ms["Uniform top-k", phase, r] / ms[label, phase, r] for r in runs]
            mine = [ms[label, phase, r] for r in runs]
            out.append({"topology": topology, "backend": backend, "plan": label, "phase": phase,
                        "median_ms": d["median_ms"], "speedup": d["speedup"], "speedup_lo_run": min(per_run),
                        "speedup_hi_run": max(per_run), "speedup_fastest": d["speedup_min"],
                        "ideal_speedup": d.get("ideal_speedup"),
                        "of_ideal": d.get("of_ideal"), "vs_topk": statistics.median(vs), "vs_topk_lo": min(vs),
                        "vs_topk_hi": max(vs),
                        "vs_topk_fastest": min(ms["Uniform top-k", phase, r] for r in runs) / min(mine),
                        "expert_share": (result.expert_share or {}).get(phase), "runs": len(runs)})
    return out


def _f(x, fmt="{:.2f}"):
    return "" if x is None or x != x else fmt.format(x)


def markdown(df, args, env) -> str:
    cmd = " ".join(["python benchmarks/bench_alloc_t_decode.py", *sys.argv[1:]])
    lines = [f"# Alloc-T vs top-k at half budget, {args.layers} decoder layers at full width, bf16, "
             f"{args.threads} threads, CPU", "",
             f"Command: `{cmd}`  ",
             f"Protocol: batch {args.batch}, prompt {args.prompt}, {args.decode} decode steps, {args.warmup} warm-up + "
             f"{args.runs} runs; speedup = median over runs of original ms / plan ms [min-max over runs]; ideal = "
             "Amdahl on the original's measured expert share; of ideal = speedup / ideal; vs top-k = median over runs "
             "of top-k ms / plan ms [min-max]; fastest = the same ratios on the fastest run of each label (other work on a "
             "shared machine only adds time). hf: labels interleaved in every run; vllm: one eager engine, the plans swapped "
             "in and interleaved in every run, decode ms = (full run - prefill run) / (decode - 1).",
             "",
             "| topology | backend | plan | phase | ms | speedup [min-max] | fastest | ideal | of ideal | vs top-k [min-max] "
             "| vs top-k fastest |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in df.itertuples():
        lines.append(f"| {r.topology} | {r.backend} | {r.plan} | {r.phase} | {r.median_ms:.1f} | "
                     f"{r.speedup:.2f} [{r.speedup_lo_run:.2f}-{r.speedup_hi_run:.2f}] | {r.speedup_fastest:.2f} | "
                     f"{_f(r.ideal_speedup)} | {_f(r.of_ideal)} | {r.vs_topk:.3f} [{r.vs_topk_lo:.2f}-{r.vs_topk_hi:.2f}] "
                     f"| {r.vs_topk_fastest:.3f} |")
    lines += ["", "```json", json.dumps(env, indent=1), "```", ""]
    return "\n".join(lines)


def figure(df, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from alloc_moe.io import atomic_path

    d = df[df["plan"] != "original"]
    long = [{**r, "kind": "measured", "value": r["speedup"]} for r in d.to_dict("records")]
    long += [{**r, "kind": "ideal", "value": r["ideal_speedup"]} for r in d.to_dict("records")
             if r["ideal_speedup"] == r["ideal_speedup"] and r["ideal_speedup"] is not None]
    import pandas as pd

    long = pd.DataFrame(long)
    long["panel"] = long["backend"] + " " + long["phase"]
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.catplot(data=long, x="plan", y="value", hue="kind", col="topology", row="panel", kind="bar",
                    height=2.4, aspect=1.3, palette={"measured": "tab:blue", "ideal": "lightgrey"}, sharey=False)
    g.set_axis_labels("", "speedup vs original")
    g.set_titles("{row_name} | {col_name}")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", labelbottom=True, labelrotation=20, labelsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
    g.figure.subplots_adjust(hspace=0.7)
    with atomic_path(path) as tmp:
        g.figure.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    plt.close(g.figure)


def profile(topologies, layers, threads) -> None:
    """Where an HF prefill and decode step's time goes (torch.profiler, ms per forward), per plan."""
    from alloc_moe.backends.hf.apply import moe_layers
    from alloc_moe.backends.hf.latency import _inputs
    from alloc_moe.core import routing
    from alloc_moe.data.zoo import make_model
    from alloc_moe.stages.latency import Protocol

    torch.set_num_threads(threads)
    drop = routing.drop_pairs

    def traced(*a, **k):
        with torch.profiler.record_function("drop_pairs"):
            return drop(*a, **k)

    routing.drop_pairs = traced
    print("| topology | plan | phase | total ms | experts ms | expert GEMMs ms | experts other ms | drop_pairs ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for topo in topologies:
        model = make_model(topology=topo, width="full", layers=layers, dtype=torch.bfloat16, seed=0)
        ls = moe_layers(model)
        prompt, steps = _inputs(model, Protocol(decode=3), torch.device("cpu"))
        plans = half_budget_plans(ls, with_sentinel=True)
        _, apply = _sentinel_apply(plans)
        for label, plan in plans:
            for phase in ("prefill", "decode"):
                stats = []
                for _ in range(2):  # the second profile is reported (the first warms up)
                    stats = _profile_once(model, apply, plan, ls, prompt, steps, phase)
                print(f"| {topo} | {label} | {phase} | " + " | ".join(f"{v:.2f}" for v in stats) + " |")
        del model


def _profile_once(model, apply, plan, layers, prompt, steps, phase):
    handles = []
    for m in layers:
        handles.append(m.experts.register_forward_pre_hook(_enter))
        handles.append(m.experts.register_forward_hook(_exit))
    handle = apply(model, plan) if plan is not None else None
    try:
        with torch.inference_mode():
            cache = model(input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values
            with torch.profiler.profile() as prof:
                if phase == "prefill":
                    model(input_ids=prompt, use_cache=True, logits_to_keep=1)
                    n = 1
                else:
                    for ids in steps:
                        cache = model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values
                    n = len(steps)
    finally:
        if handle is not None:
            handle.remove()
        for h in handles:
            h.remove()
    ev = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    experts = ev["experts_module"].cpu_time_total if "experts_module" in ev else 0.0
    gemm = ev["aten::_grouped_mm"].cpu_time_total if "aten::_grouped_mm" in ev else 0.0
    dp = ev["drop_pairs"].cpu_time_total if "drop_pairs" in ev else 0.0
    return [x / 1e3 / n for x in (total, experts, gemm, experts - gemm, dp)]


_RF: list = []


def _enter(module, args):
    rf = torch.autograd.profiler.record_function("experts_module")
    rf.__enter__()
    _RF.append(rf)


def _exit(module, args, output):
    _RF.pop().__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--layers", type=int, default=3, help="decoder layers (DeepSeek-V2-Lite's layer 0 is dense)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(REPO / "results" / "benchmarks"))
    ap.add_argument("--name", default="alloc-t-decode")
    ap.add_argument("--profile", action="store_true", help="print where HF time goes (torch.profiler) and exit")
    args = ap.parse_args()
    topologies = args.topologies.split(",")
    if args.profile:
        profile(topologies, args.layers, args.threads)
        return
    import pandas as pd

    from alloc_moe.backends.hf.apply import moe_layers
    from alloc_moe.data.zoo import write_model
    from alloc_moe.harness.provenance import environment
    from alloc_moe.io import atomic_path, atomic_write_text
    from alloc_moe.stages.latency import Protocol, summarize

    torch.set_num_threads(args.threads)
    backends = args.backends.split(",")
    protocol = Protocol(batch=args.batch, prompt=args.prompt, decode=args.decode, warmup=args.warmup, runs=args.runs,
                        threads=args.threads, dtype="bfloat16")
    rows = []
    for topo in topologies:
        with tempfile.TemporaryDirectory(prefix="alloc_t_bench.") as d:
            model = write_model(Path(d) / "model", topology=topo, width="full", layers=args.layers,
                                dtype=torch.bfloat16, seed=0)
            for backend in backends:
                plans = half_budget_plans(moe_layers(model), with_sentinel=backend == "hf")
                if backend == "hf":
                    result = measure_hf(model, plans, protocol)
                else:
                    result = measure_vllm(Path(d) / "model", plans, protocol)
                _, summary = summarize(result, plans)
                rows += table_rows(topo, backend, result, plans, summary)
                print(pd.DataFrame(rows[-2 * len(plans):]).to_string(index=False), flush=True)
            del model
    df = pd.DataFrame(rows)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "threads": args.threads, "topologies": topologies, "backends": backends,
           "protocol": {k: getattr(protocol, k) for k in ("batch", "prompt", "decode", "warmup", "runs")},
           "layers": args.layers}
    with atomic_path(out / f"{args.name}.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f", lineterminator="\n")
    figure(df, out / f"{args.name}.png")
    report = markdown(df, args, env)
    atomic_write_text(out / f"{args.name}.md", report)
    print(report)


if __name__ == "__main__":
    main()
