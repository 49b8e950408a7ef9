"""Paired standard errors per group with emb_world's (or emb_world_forms') items independent vs resampled by fact
(docs/results/task-suite-v3.md, "R2, measured"). Run in the directory of a finished fidelity study (config/fidelity.yaml):

    python docs/results/task_suite_v3_clusters.py [RUN_DIR]

For each training seed it builds the claims table of that seed alone twice (clusters off / on) and compares the
single-seed rows of Figs. 3, 4 and 6: median paired SE, how many rows resolve 1 point (1.96 x SE <= 1), how many
verdicts the clustering changes. Then the same counts for the rows of the study's own claims.csv (all seeds).
"""

import glob
import sys
from pathlib import Path

import pandas as pd

from alloc_moe.report.claims import claims_table, item_clusters, resolution

run = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
kw = dict(k_base=1, calibration="balanced")
clusters = item_clusters(sorted(run.glob("results/tasks/embedded-v*")))  # the run's suite (v3, or v4 staged)
groups = ["NLU", "Reasoning", "Math", "mean"]
rows = []
for s in sorted(int(p.rsplit("-s", 1)[1]) for p in glob.glob(str(run / "results/embedded-s*"))):
    evals = sorted(glob.glob(str(run / f"results/embedded-s{s}/eval/*/*.json")))
    keep = lambda d: d[d.claim.str.startswith(("fig3", "fig4", "fig6")) & d.group.isin(groups)]
    a, b = keep(claims_table(evals, **kw)), keep(claims_table(evals, **kw, clusters=clusters))
    rows.append(a.merge(b, on=["claim", "budget", "group", "comparison"], suffixes=("_item", "_fact")).assign(seed=s))
m = pd.concat(rows)
for g in groups:
    d = m[m.group == g]
    print(f"{g}: {len(d)} rows; median paired SE by items {d.se_paired_item.median():.3f}, by facts "
          f"{d.se_paired_fact.median():.3f}; 1.96 x SE <= 1 in {(1.96 * d.se_paired_item <= 1).sum()} (items) / "
          f"{(1.96 * d.se_paired_fact <= 1).sum()} (facts) rows; verdicts changed {(d.verdict_item != d.verdict_fact).sum()}")
claims = run / "results/summary/claims.csv"
if claims.exists():  # the study's own table: rows over all its seeds, items resampled by fact where clustered
    print("Over the seeds (claims.csv):")
    print(resolution(pd.read_csv(claims)).to_string(index=False))
