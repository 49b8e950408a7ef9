"""Score the ORIGINAL model (no plan) on every embedded-task candidate, per training seed (docs/results/task-suite-v2.md).

Only the original model is evaluated here: no method and no budget ever sees a candidate. Usage:

    python docs/results/task_suite_v2_design.py --model s0=DIR --model s1=DIR --model s2=DIR --work /tmp/design \\
        --out docs/results/task-suite-v2-scores.json [--tasks a,b,...] [--threads 1]
    python docs/results/task_suite_v2_design.py --table docs/results/task-suite-v2-scores.json   # markdown table

Each candidate gets `--items` items (default 800; the v1 counts for the v1 tasks) from `embedded.make_items` with the
suite's seed; scores land in --out (merged with what is already there), per task and seed: value, stderr, chance.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from alloc_moe.data.tasks import embedded
from alloc_moe.io import atomic_write_text

V1 = ["emb_agreement", "emb_selection", "emb_yesno", "emb_reverse", "emb_sort", "emb_minmax", "emb_digit",
      "emb_arith_gen"]


def write_candidates(folder: Path, tasks: list[str], items: int) -> None:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        n = embedded.ITEMS_V1[t] if t in embedded.ITEMS_V1 else items
        rows = embedded.make_items(t, n)
        atomic_write_text(folder / f"{t}.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
        cfg = embedded.task_config(t, f"{t}.jsonl", embedded.chance(rows))
        atomic_write_text(folder / f"{t}.yaml", yaml.safe_dump(cfg, sort_keys=False))


def passes(per_seed: dict) -> bool:
    """R1: chance + 10 <= score <= 95 on every seed."""
    return all(v["chance"] + 10 <= v["value"] <= 95 for v in per_seed.values())


def table(scores: dict, labels=("s0", "s1", "s2")) -> str:
    """Markdown: per task, chance, the original model's score per seed (+- lm-eval's SE) and whether R1 holds."""
    group = {t: embedded._GROUP.get(t.split("@")[0], "?") for t in scores}  # task@v2: at its v2 item count
    out = ["| task | group | items | chance | " + " | ".join(labels) + " | R1 |", "|---|---|---:|---:|" +
           "---:|" * len(labels) + "---|"]
    order = {"NLU": 0, "Reasoning": 1, "Math": 2}
    for t in sorted(scores, key=lambda t: (order.get(group[t], 9), t)):
        per = scores[t]
        first = next(iter(per.values()))
        cells = [f"{per[s]['value']:.2f} +- {per[s]['stderr']:.2f}" if s in per else "-" for s in labels]
        ok = "yes" if all(s in per for s in labels) and passes(per) else "no"
        out.append(f"| {t} | {group[t]} | {first['items']} | {first['chance']:.2f} | " + " | ".join(cells) + f" | {ok} |")
    return "\n".join(out)


def main() -> int:
    if sys.argv[1:2] == ["--table"]:
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="label=model dir (the original model of a seed)")
    ap.add_argument("--tasks", default=",".join(V1 + list(embedded.CANDIDATES)))
    ap.add_argument("--items", type=int, default=800)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    work = Path(args.work)
    write_candidates(work / "tasks", tasks, args.items)
    out = Path(args.out)
    scores = json.loads(out.read_text()) if out.exists() else {}
    for spec in args.model:
        label, model = spec.split("=", 1)
        res = work / f"{label}.json"
        subprocess.run([sys.executable, "-m", "alloc_moe.cli", "eval", "--model", model, "--plan", "original",
                        "--tasks", ",".join(str(work / "tasks" / f"{t}.yaml") for t in tasks), "--out", str(res),
                        "--batch-size", "128", "--threads", str(args.threads)], check=True)
        r = json.loads(res.read_text())
        for row in r["rows"]:
            scores.setdefault(row["task"], {})[label] = {
                "value": row["value"], "stderr": row["stderr"], "chance": r["chance"].get(row["task"], 0.0),
                "items": sum(1 for _ in (work / "tasks" / f"{row['task']}.jsonl").open())}
        atomic_write_text(out, json.dumps(scores, indent=1, sort_keys=True) + "\n")
        print(label, {row["task"]: row["value"] for row in r["rows"]}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
