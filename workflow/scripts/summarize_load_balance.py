import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd

from alloc_moe.summary import write_csv

write_csv(pd.concat([pd.read_csv(p) for p in snakemake.input], ignore_index=True), snakemake.output[0])
