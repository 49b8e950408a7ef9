# Load balance (paper 4.4 / Figs. 7, 8; 4.5 / Fig. 12): per-layer expert-load fidelity of each plan vs the original
# on the held-out text, and Alloc-T's experts per token vs routing entropy. Settings: the `load_balance:` config key.
rule load_balance:
    input:
        model_input,
        text=[EVAL_TEXT] if EVAL_TEXT.startswith("results/") or os.path.exists(EVAL_TEXT) else [],
        plans=lambda wc: lb_plans(wc.run),
    output:
        metrics="results/{run}/load_balance/metrics.csv",
        loads="results/{run}/load_balance/loads.csv",
        tokens="results/{run}/load_balance/tokens.csv",
    params:
        model=model_dir,
        name=lambda wc: RUNS[wc.run][0],
        calib=lambda wc, input: input.text or EVAL_TEXT,
        seq_len=LB.get("seq_len", EVAL.get("seq_len", 64)),
        max_tokens=LB.get("max_tokens", 8192),
        batch_size=LB.get("batch_size", 16),
        code=code("alloc_moe.stages.load_balance"),
    threads: 1
    resources:
        gpu=gpu_of_run,  # a real checkpoint loads on the GPU (--device auto)
        mem_mb=checkpoint_or(64000, 4000),
        runtime=checkpoint_or(60, 30),
    log:
        "results/{run}/logs/load_balance.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe load-balance --model {params.model} --model-name {params.name} --calib {params.calib} "
        "--seq-len {params.seq_len} --max-tokens {params.max_tokens} --batch-size {params.batch_size} "
        "--threads {threads} --no-progress --plans {input.plans} --out {output.metrics} --loads {output.loads} "
        "--tokens {output.tokens} > {log} 2>&1"


rule summarize_load_balance:
    input:
        [f"results/{run}/load_balance/metrics.csv" for run in RUNS],
    output:
        "results/summary/load_balance.csv",
    params:
        seeds=[RUNS[run][1] for run in RUNS],
        code=code("workflow/scripts/summarize_load_balance.py"),
    log:
        "results/logs/summarize_load_balance.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/summarize_load_balance.py"


rule plot_load_balance:
    input:
        metrics="results/{run}/load_balance/metrics.csv",
        loads="results/{run}/load_balance/loads.csv",
        tokens="results/{run}/load_balance/tokens.csv",
        plan=lambda wc: lb_figure_plan(wc.run),
    output:
        loads=report("results/{run}/figures/expert_load.png", caption="../report/fig7_expert_load.rst",
                     category="Load balance", subcategory="{run}", labels={"paper": "Fig. 7"}),
        layers=report("results/{run}/figures/load_balance_by_layer.png",
                      caption="../report/fig8_load_balance_by_layer.rst", category="Load balance",
                      subcategory="{run}", labels={"paper": "Fig. 8"}),
        allocation=report("results/{run}/figures/plan_allocation.png", caption="../report/fig12a_plan_allocation.rst",
                          category="Load balance", subcategory="{run}", labels={"paper": "Fig. 12a"}),
        entropy=report("results/{run}/figures/experts_vs_entropy.png",
                       caption="../report/fig12b_experts_vs_entropy.rst", category="Load balance",
                       subcategory="{run}", labels={"paper": "Fig. 12b"}),
    params:
        layer=LB.get("figure_layer"),
        code=code("workflow/scripts/plot_load_balance.py"),
    log:
        "results/{run}/logs/plot_load_balance.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/plot_load_balance.py"
