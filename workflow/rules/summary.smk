from alloc_moe.harness.manifest import config_hash


rule summarize:
    input:
        all_evals(),
    output:
        accuracy="results/summary/accuracy.csv",
        perplexity="results/summary/perplexity.csv",
        tables=expand("results/summary/tables/{table}_{model}.md", table=["table2", "table3", "table4"], model=MODEL_NAMES),
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


# The paper's claims (alloc_moe/report/claims.py): effect, paired 95% interval and verdict per claim, from the eval
# JSONs' per-item results (summarize's inputs, whatever their form) and the latency and load-balance tables; the
# fidelity study is written here, built around the claims table.
rule claims:
    input:
        evals=rules.summarize.input,
        latency="results/summary/latency.csv",
        load_balance="results/summary/load_balance.csv",
        tasks=lambda wc: sorted({f"results/tasks/{s}" for r in RUNS if (s := embedded_suite(r))}),  # item clusters
    output:
        claims="results/summary/claims.csv",
        fidelity="results/summary/fidelity.md",
    params:
        k_base=K_BASE,
        calibration=CAL_DEFAULT,
        code=code("workflow/scripts/claims.py"),
    log:
        "results/logs/claims.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/claims.py"


rule figure_perplexity:
    input:
        "results/summary/perplexity.csv",
    output:
        report("results/summary/figures/perplexity_{model}.png", caption="../report/perplexity.rst",
               category="Perplexity", subcategory="{model}", labels={"paper": "none (perplexity)"}),
    params:
        k_base=K_BASE,
        calibration=CAL_DEFAULT,
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
        report("results/summary/figures/{fig}_{model}.png", caption="../report/group_scores.rst", category="Accuracy",
               subcategory="{model}", labels=lambda wc: {"paper": f"Fig. {wc.fig[3:]}"}),
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


rule figure_tradeoff:
    input:
        accuracy="results/summary/accuracy.csv",
        latency="results/summary/latency.csv",
    output:
        report("results/summary/figures/tradeoff_{model}.png", caption="../report/tradeoff.rst",
               category="Accuracy vs speedup", subcategory="{model}", labels={"paper": "Fig. 1"}),
    params:
        k_base=K_BASE,
        calibration=CAL_DEFAULT,
        code=code("workflow/scripts/plot_tradeoff.py"),
    log:
        "results/logs/figure_tradeoff_{model}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/plot_tradeoff.py"


# HTML views of the tables for `snakemake --report`, which shows HTML inline but .md/.csv/.json only as downloads.
PAPER_TABLES = {"table2": "Table 2", "table3": "Table 3", "table4": "Table 4"}
# page -> (source table in results/summary, caption, report category, subcategory)
SUMMARY_TABLES = {
    "accuracy": ("accuracy.csv", "accuracy_csv", "Accuracy", "all models"),
    "fidelity": ("fidelity.md", "fidelity", "Accuracy", "all models"),
    "claims": ("claims.csv", "claims_csv", "Accuracy", "all models"),
    "perplexity": ("perplexity.csv", "perplexity_csv", "Perplexity", "all models"),
    "latency": ("latency.csv", "latency_csv", "Latency", "all runs"),
    "load_balance": ("load_balance.csv", "load_balance_csv", "Load balance", "all runs"),
    "environment": ("environment.json", "environment", "Environment", None),
}


rule paper_tables_html:
    input:
        [f"results/summary/tables/{t}_{{model}}.md" for t in PAPER_TABLES],
    output:
        [report(f"results/summary/report/{t}_{{model}}.html", caption=f"../report/{t}.rst", category="Accuracy",
                subcategory="{model}", labels={"paper": name}) for t, name in PAPER_TABLES.items()],
    params:
        code=code("workflow/scripts/report_tables.py"),
    log:
        "results/logs/paper_tables_html_{model}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/report_tables.py"


rule summary_tables_html:
    input:
        [f"results/summary/{src}" for src, *_ in SUMMARY_TABLES.values()],
    output:
        [report(f"results/summary/report/{page}.html", caption=f"../report/{caption}.rst", category=category,
                subcategory=subcategory, labels={"table": src})
         for page, (src, caption, category, subcategory) in SUMMARY_TABLES.items()],
    params:
        config_hash=config_hash(config),
        code=code("workflow/scripts/report_tables.py"),
    log:
        "results/logs/summary_tables_html.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/report_tables.py"
