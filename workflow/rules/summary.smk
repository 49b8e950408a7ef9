rule summarize_perplexity:
    input:
        original="results/{model}/eval/original.json",
        plans=lambda wc: expand("results/{{model}}/eval/{plan}.json", plan=plan_ids(wc.model)),
    output:
        table="results/{model}/summary/perplexity.csv",
        environment="results/{model}/summary/environment.json",
    params:
        pkg=PKG,
    log:
        "results/{model}/logs/summarize_perplexity.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/summarize_perplexity.py"


rule plot_perplexity:
    input:
        "results/{model}/summary/perplexity.csv",
    output:
        report("results/{model}/figures/perplexity_vs_budget.png", caption="../report/perplexity.rst", category="Perplexity"),
    params:
        pkg=PKG,
    log:
        "results/{model}/logs/plot_perplexity.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/plot_perplexity.py"
