import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd

from alloc_moe.report.summary import write_csv

# one run per (model, seed): the seed column keeps the runs of a multi-seed config apart, as in latency.csv
frames = [pd.read_csv(path).assign(seed=seed) for path, seed in zip(snakemake.input, snakemake.params.seeds)]
write_csv(pd.concat(frames, ignore_index=True), snakemake.output[0])
