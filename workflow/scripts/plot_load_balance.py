import sys

sys.stderr = open(snakemake.log[0], "w")

from pathlib import Path

import pandas as pd

from alloc_moe.core.plan import Plan
from alloc_moe.report import plots

plan = Plan.load(snakemake.input.plan)
label = Path(snakemake.input.plan).stem
loads = pd.read_csv(snakemake.input.loads)
layers = sorted(loads["layer"].unique())
layer = snakemake.params.layer if snakemake.params.layer is not None else layers[len(layers) // 2]
plots.expert_load(loads, snakemake.output.loads, plan=label, layer=layer)
plots.load_balance_by_layer(pd.read_csv(snakemake.input.metrics), snakemake.output.layers, plan=label)
plots.plan_allocation(plan, snakemake.output.allocation)
plots.experts_vs_entropy(pd.read_csv(snakemake.input.tokens), snakemake.output.entropy, plan=label, layer=layer)
