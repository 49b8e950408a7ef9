import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd

from alloc_moe.report.plots import accuracy_vs_speedup
from alloc_moe.report.summary import tradeoff_table

model = snakemake.wildcards.model
acc = pd.read_csv(snakemake.input.accuracy, dtype={"k_base": "string"}, keep_default_na=False)
lat = pd.read_csv(snakemake.input.latency)
t = tradeoff_table(acc[acc.model == model], lat[lat.model == model], k_base=snakemake.params.k_base,
                   calibration=snakemake.params.calibration)
accuracy_vs_speedup(t, snakemake.output[0], title=f"{model}: accuracy vs measured speedup (paper Fig. 1)")
