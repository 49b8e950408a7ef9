"""The accuracy stage's per-plan cost: lm-eval as it comes vs with the tokenization kept across plans and lm-eval's
environment report collected once (`backends/hf/lm.py`, `stages/accuracy.py`), timed in the same run.

    python benchmarks/bench_eval_plans.py --run results/embedded-s0 [--budget B12] [--plans 4] [--reps 3]

After the main job (`snakemake --cores 2`): evaluates `--plans` plans of one budget on the run's task suite, as one
accuracy job does (perplexity left out), in a fresh process per (variant, repetition), the variants interleaved.
Prints a markdown table: median seconds per plan after the first (the first plan pays the tokenization in both),
and the ratio. Both variants' results are compared: they must be identical.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> None:
    """One process: evaluate the plans, print seconds per plan as JSON; `--variant lm-eval` undoes the two changes."""
    from alloc_moe.backends.hf import lm
    from alloc_moe.core.plan import Plan
    from alloc_moe.stages import accuracy

    if args.variant == "lm-eval":
        from lm_eval.models.huggingface import HFLM

        lm._hflm_class = lambda: HFLM
        accuracy._collect_env_info_once = lambda: None
    import torch

    torch.set_num_threads(1)
    tasks = accuracy.resolve_tasks(args.suite, args.include_path)
    plans = [Plan.load(p) for p in args.plan]
    times, scores = [], []
    for plan in plans:
        t = time.perf_counter()
        (res,) = accuracy.evaluate(args.model, [plan], tasks, batch_size=128, include_path=args.include_path)
        times.append(time.perf_counter() - t)
        scores.append(res["rows"])
    print(json.dumps({"times": times, "rows": scores}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="results/embedded-s0")
    ap.add_argument("--suite", default="embedded-v3")
    ap.add_argument("--budget", default="B12")
    ap.add_argument("--plans", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--plan", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--include-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    run = Path(args.run)
    plans = sorted(str(p) for p in (run / "plans").glob(f"*__{args.budget}.json"))[: args.plans]
    if len(plans) < 2:
        sys.exit(f"bench_eval_plans: {run}/plans has {len(plans)} plan(s) at {args.budget}; run the main job first")
    common = ["--model", str(run / "model"), "--suite", args.suite, "--include-path", f"results/tasks/{args.suite}",
              *[a for p in plans for a in ("--plan", p)]]
    per_plan = {"lm-eval": [], "kept": []}
    rows = {}
    for _ in range(args.reps):
        for variant in per_plan:
            out = subprocess.run([sys.executable, "-P", __file__, "--variant", variant, *common], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            per_plan[variant] += r["times"][1:]
            rows[variant] = r["rows"]
    assert rows["lm-eval"] == rows["kept"], "the two variants' results differ"
    base, kept = (statistics.median(per_plan[v]) for v in ("lm-eval", "kept"))
    print(f"# {run}: {len(plans)} plans at {args.budget}, suite {args.suite}, {args.reps} processes per variant, "
          "1 thread; seconds per plan after the first (median)")
    print("| variant | s / plan | ratio |\n|---|---:|---:|")
    print(f"| lm-eval as it comes | {base:.2f} | 1.00 |")
    print(f"| tokenization kept, env report once | {kept:.2f} | {kept / base:.2f} |")
    print("results identical: yes")


if __name__ == "__main__":
    main()
