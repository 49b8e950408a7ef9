# Alloc-MoE reproduction workflow. `snakemake --cores N` runs the embedded default: a small MoE the workflow trains
# itself, the embedded task suite, every comparison of the paper at 4 budgets, latency and load balance
# (no GPU, no download).
# Stages live in workflow/rules/, the logic in the alloc_moe package.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"  # `snakemake --report results/report.html`: every figure and table, captioned


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
        "results/summary/accuracy.csv",
        "results/summary/perplexity.csv",
        expand("results/summary/figures/{fig}_{model}.png", fig=["fig3", "fig4", "fig6", "tradeoff"], model=MODEL_NAMES),
        # perplexity is measured with the hf backend only (a vllm model's accuracy jobs report none)
        expand("results/summary/figures/perplexity_{model}.png",
               model=[m for m in MODEL_NAMES if config["models"][m].get("backend", "hf") == "hf"]),
        "results/summary/latency.csv",
        "results/summary/load_balance.csv",
        "results/summary/manifest.json",
        expand("results/{run}/figures/{f}.png", run=RUNS, f=["speedup_vs_budget", "expert_load", "load_balance_by_layer",
                                                              "plan_allocation", "experts_vs_entropy"]),
        expand("results/summary/report/{table}_{model}.html", table=PAPER_TABLES, model=MODEL_NAMES),
        expand("results/summary/report/{page}.html", page=SUMMARY_TABLES),
    default_target: True
