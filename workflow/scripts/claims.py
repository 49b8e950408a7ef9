import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd

from alloc_moe.io import atomic_write_text
from alloc_moe.report.claims import (claims_details, claims_summary, claims_table, item_clusters, load_entries,
                                     resolution_summary, seed_resolution)
from alloc_moe.report.summary import accuracy_table, eval_perplexity_table, fidelity_report, write_csv

evals = list(snakemake.input.evals)  # summarize's inputs: eval JSON files or directories of them
kw = dict(k_base=snakemake.params.k_base, calibration=snakemake.params.calibration)
entries = load_entries(evals)  # read once, for claims_table and seed_resolution
clusters = item_clusters(snakemake.input.tasks)  # the embedded suites' task folders
claims = claims_table(entries, **kw, latency=pd.read_csv(snakemake.input.latency),
                      load_balance=pd.read_csv(snakemake.input.load_balance), clusters=clusters)
write_csv(claims, snakemake.output.claims)
scores = fidelity_report(accuracy_table(evals), eval_perplexity_table(evals), **kw)
atomic_write_text(snakemake.output.fidelity, claims_summary(claims) + "\n"
                  + resolution_summary(claims, per_seed=seed_resolution(entries, **kw, clusters=clusters))
                  + "\n## Scores over training seeds\n\n" + scores
                  + "\n" + claims_details(claims))
