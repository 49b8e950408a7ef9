import sys

sys.stderr = open(snakemake.log[0], "w")

import json

from alloc_moe.io import atomic_write_text
from alloc_moe.provenance import environment
from alloc_moe.summary import perplexity_table, write_csv

write_csv(perplexity_table(snakemake.input.original, list(snakemake.input.plans)), snakemake.output.table)
# versions, git commit and hardware next to the table (kept out of the CSV so the CSV stays byte-identical)
atomic_write_text(snakemake.output.environment, json.dumps(environment(), indent=1) + "\n")
