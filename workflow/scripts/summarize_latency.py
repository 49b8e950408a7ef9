import sys

sys.stderr = open(snakemake.log[0], "w")

import json

import pandas as pd

from alloc_moe.report.summary import write_csv
from alloc_moe.stages.latency import speedup_frame

frames = [speedup_frame(json.loads(open(path).read()), model=model).assign(seed=seed)
          for model, seed, path in zip(snakemake.params.models, snakemake.params.seeds, snakemake.input)]
write_csv(pd.concat(frames, ignore_index=True), snakemake.output[0])
