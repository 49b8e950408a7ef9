import sys

sys.stderr = open(snakemake.log[0], "w")

from alloc_moe.summary import perplexity_table, write_csv

write_csv(perplexity_table(snakemake.input.original, list(snakemake.input.plans)), snakemake.output[0])
