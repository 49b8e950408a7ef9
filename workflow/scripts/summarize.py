import sys

sys.stderr = open(snakemake.log[0], "w")

import json
from pathlib import Path

from alloc_moe.harness.provenance import environment
from alloc_moe.io import atomic_write_text
from alloc_moe.report.summary import (
    accuracy_table,
    eval_files,
    eval_perplexity_table,
    paper_tables,
    write_csv,
)

# the accuracy jobs' folders (rules/accuracy.smk), one JSON per plan
evals = eval_files(snakemake.input)
acc = accuracy_table(evals)
write_csv(acc, snakemake.output.accuracy)
ppl = eval_perplexity_table(evals)
write_csv(ppl, snakemake.output.perplexity)
tables = paper_tables(acc, k_base=snakemake.params.k_base, calibration=snakemake.params.calibration,
                      k_base_sweep=snakemake.params.k_base_sweep)
for path in snakemake.output.tables:
    atomic_write_text(path, tables[Path(path).stem])
# versions, git commit and hardware next to the tables (kept out of the CSVs so they stay byte-identical)
atomic_write_text(snakemake.output.environment, json.dumps(environment(), indent=1) + "\n")
