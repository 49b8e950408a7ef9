def all_evals(wildcards=None):
    return [f"results/{run}/eval/{p}.json" for run in RUNS for p in ["original", *plan_ids(run)]]


MODEL_NAMES = sorted(config["models"])


rule summarize:
    input:
        all_evals(),
    output:
        accuracy="results/summary/accuracy.csv",
        perplexity="results/summary/perplexity.csv",
        tables=expand("results/summary/tables/{table}_{model}.md", table=["table2", "table3", "table4"], model=MODEL_NAMES),
        fidelity="results/summary/fidelity.md",
        environment="results/summary/environment.json",
    params:
        k_base=K_BASE,
        k_base_sweep=config.get("k_base_sweep", []),
        calibration=CAL_DEFAULT,
        code=code("workflow/scripts/summarize.py"),
    log:
        "results/logs/summarize.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/summarize.py"


rule figure_perplexity:
    input:
        "results/summary/perplexity.csv",
    output:
        report("results/summary/figures/perplexity_{model}.png", caption="../report/perplexity.rst",
               category="Perplexity", labels={"model": "{model}"}),
    params:
        code=code("workflow/scripts/plot_perplexity.py"),
    log:
        "results/logs/figure_perplexity_{model}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/plot_perplexity.py"


rule figure:
    input:
        "results/summary/accuracy.csv",
    output:
        report("results/summary/figures/{fig}_{model}.png", caption="../report/figure.rst", category="Accuracy",
               subcategory="{model}", labels={"figure": "{fig}", "model": "{model}"}),
    wildcard_constraints:
        fig="fig3|fig4|fig6",
    params:
        k_base=K_BASE,
        calibration=CAL_DEFAULT,
        code=code("workflow/scripts/plot_accuracy.py"),
    log:
        "results/logs/figure_{fig}_{model}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/plot_accuracy.py"
