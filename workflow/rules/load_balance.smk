# Load-balance stage (paper 4.4 / Figs. 7, 8; 4.5 / Fig. 12): per-layer expert-load fidelity of each plan vs the
# original on the evaluation text, and Alloc-T's experts per token vs routing entropy.
# Settings: the top-level `load_balance:` config key (see the README's latency section for the schema).
_LB = config.get("load_balance", {})
_LB_EVAL = config["evaluation"]


def _load_balance_plans(wildcards):
    ids = _LB.get("plans") or plan_ids(wildcards.model)
    return expand("results/{model}/plans/{plan}.json", model=wildcards.model, plan=ids)


def _figure_plan(wildcards):
    """The plan the per-plan figures show: `load_balance.figure_plan`, else the first plan of the stage."""
    plan = _LB.get("figure_plan") or (_LB.get("plans") or plan_ids(wildcards.model))[0]
    return f"results/{wildcards.model}/plans/{plan}.json"


rule load_balance:
    input:
        model_input,
        corpus_input("evaluation"),
        plans=_load_balance_plans,
    output:
        metrics="results/{model}/load_balance/metrics.csv",
        loads="results/{model}/load_balance/loads.csv",
        tokens="results/{model}/load_balance/tokens.csv",
    params:
        model=model_dir,
        data=corpus_file("evaluation"),
        seq_len=_LB.get("seq_len", _LB_EVAL["seq_len"]),
        max_tokens=_LB.get("max_tokens", _LB_EVAL["max_tokens"]),
        batch_size=_LB.get("batch_size", _LB_EVAL["batch_size"]),
        pkg=PKG,
    threads: THREADS
    log:
        "results/{model}/logs/load_balance.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe load-balance --model {params.model} --model-name {wildcards.model} --calib {params.data} "
        "--seq-len {params.seq_len} --max-tokens {params.max_tokens} --batch-size {params.batch_size} "
        "--threads {threads} --no-progress --plans {input.plans} --out {output.metrics} --loads {output.loads} "
        "--tokens {output.tokens} > {log} 2>&1"


rule summarize_load_balance:
    input:
        expand("results/{model}/load_balance/metrics.csv", model=MODELS),
    output:
        "results/summary/load_balance.csv",
    params:
        pkg=PKG,
    log:
        "results/logs/summarize_load_balance.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/summarize_load_balance.py"


rule plot_load_balance:
    input:
        metrics="results/{model}/load_balance/metrics.csv",
        loads="results/{model}/load_balance/loads.csv",
        tokens="results/{model}/load_balance/tokens.csv",
        plan=_figure_plan,
    output:
        loads="results/{model}/figures/expert_load.png",
        layers="results/{model}/figures/load_balance_by_layer.png",
        allocation="results/{model}/figures/plan_allocation.png",
        entropy="results/{model}/figures/experts_vs_entropy.png",
    params:
        layer=_LB.get("figure_layer"),
        pkg=PKG,
    log:
        "results/{model}/logs/plot_load_balance.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/plot_load_balance.py"
