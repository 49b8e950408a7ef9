import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd

from alloc_moe.report.plots import perplexity_vs_budget

model = snakemake.wildcards.model
df = pd.read_csv(snakemake.input[0], dtype={"k_base": "string"}, keep_default_na=False)
kb, cal = str(snakemake.params.k_base), snakemake.params.calibration  # the default K_base and calibration set
df = df[(df.model == model) & ((df.token_allocation != "alloc-t") | (df.k_base == kb))]
df = df[df.calibration.isin(["", "none", cal])]
perplexity_vs_budget(df, snakemake.output[0], title=f"{model}: held-out perplexity per family")
