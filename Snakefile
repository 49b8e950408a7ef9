# Alloc-MoE reproduction workflow. `snakemake --cores N` runs the embedded default (a small zoo MoE the workflow
# makes itself: no GPU, no download). Stages live in workflow/rules/, the logic in the alloc_moe package.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/plans.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/summary.smk"


rule all:
    input:
        expand("results/{model}/summary/perplexity.csv", model=MODELS),
        expand("results/{model}/figures/perplexity_vs_budget.png", model=MODELS),
    default_target: True
