import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd

from alloc_moe.plots import perplexity_vs_budget

perplexity_vs_budget(pd.read_csv(snakemake.input[0]), snakemake.output[0], title=snakemake.wildcards.model)
