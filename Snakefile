# Alloc-MoE reproduction workflow. `snakemake --cores N` runs the embedded default: a small MoE the workflow trains
# itself, the embedded task suite, every comparison of the paper at 4 budgets, latency and load balance
# (no GPU, no download).
# Stages live in workflow/rules/, the logic in the alloc_moe package.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"  # `snakemake --report results/report.html`: every figure and table, captioned


include: "workflow/rules/scheduler.smk"  # local runs: no job-rate limiter and its 1-s timer chains
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/plans.smk"
include: "workflow/rules/accuracy.smk"
include: "workflow/rules/latency.smk"
include: "workflow/rules/load_balance.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/manifest.smk"


rule all:
    input:
        final_targets(),
    default_target: True
