import sys

sys.stderr = open(snakemake.log[0], "w")

import json

from alloc_moe.report.plots import speedup_vs_budget
from alloc_moe.stages.latency import speedup_frame

summary = json.loads(open(snakemake.input[0]).read())
title = f"{snakemake.wildcards.run} ({summary['device']}, {summary['dtype']})"
speedup_vs_budget(speedup_frame(summary), snakemake.output[0], title=title)
