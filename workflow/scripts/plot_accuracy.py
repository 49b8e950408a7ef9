import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd

from alloc_moe.report.plots import group_scores_vs_budget
from alloc_moe.report.summary import COMPARISONS, group_table

fig, model = snakemake.wildcards.fig, snakemake.wildcards.model
acc = pd.read_csv(snakemake.input[0], dtype={"k_base": "string"}, keep_default_na=False)
acc = acc[acc.model == model]
g = group_table(acc, k_base=snakemake.params.k_base, calibration=snakemake.params.calibration)
titles = {"fig3": "Alloc-MoE vs baselines (paper Fig. 3)", "fig4": "layer allocation methods, top-k (paper Fig. 4)",
          "fig6": "token allocation methods under Uniform (paper Fig. 6)"}
group_scores_vs_budget(g, COMPARISONS[fig], snakemake.output[0], title=f"{model}: {titles[fig]}")
