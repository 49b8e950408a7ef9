# Latency (paper 4.2 / Fig. 5, Appendix A.2): prefill and decode latency of the original model and its plans,
# interleaved run by run in one process, with the ideal speedup (only the expert GEMMs shrink) next to it.
# Settings: the top-level `latency:` config key. The embedded default runs a short protocol on CPU on the trained
# model's latency twin (`latency.model: twin`, rule make_twin in model.smk): plans are per-layer K and token settings,
# so they apply unchanged to a model of the same topology, and a plan's compute is set by its budget, not the weights.
rule latency:
    input:
        latency_model_input,
        plans=lambda wc: latency_plans(wc.run),
    output:
        table="results/{run}/latency/latency.csv",
        summary="results/{run}/latency/latency.json",
    params:
        model=latency_model,
        backend=lambda wc: latency_backend(wc.run),
        vllm=lambda wc: vllm_args(wc.run) if latency_backend(wc.run) == "vllm" else "",
        protocol=" ".join(f"--{k} {LAT.get(k, d)}" for k, d in
                          [("batch", 8), ("prompt", 32), ("decode", 128), ("warmup", 5), ("runs", 10)]),
        device=LAT_DEVICE,
        dtype=LAT.get("dtype", "auto"),
        max_threads=latency_max_threads,  # a constant, not --cores: a params change re-runs the job
        code=code("alloc_moe.stages.latency"),
    threads: lambda wildcards: workflow.cores  # alone on the machine's cores: timings of concurrent jobs disturb each other
    resources:
        gpu=latency_gpu,
        mem_mb=checkpoint_or(64000, 4000),
        runtime=checkpoint_or(60, 30),
    log:
        "results/{run}/logs/latency.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe latency --model {params.model} --plans original {input.plans} --backend {params.backend} "
        "{params.protocol} --device {params.device} --dtype {params.dtype} {params.vllm} --threads $(( {params.max_threads} > 0 && {params.max_threads} < {threads} ? {params.max_threads} : {threads} )) "
        "--out {output.table} --summary {output.summary} > {log} 2>&1"


rule summarize_latency:
    input:
        [f"results/{run}/latency/latency.json" for run in RUNS],
    output:
        "results/summary/latency.csv",
    params:
        models=[RUNS[run][0] for run in RUNS],
        seeds=[RUNS[run][1] for run in RUNS],
        code=code("workflow/scripts/summarize_latency.py"),
    log:
        "results/logs/summarize_latency.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/summarize_latency.py"


rule plot_latency:
    input:
        "results/{run}/latency/latency.json",
    output:
        report("results/{run}/figures/speedup_vs_budget.png", caption="../report/latency.rst", category="Latency",
               subcategory="{run}", labels={"paper": "Fig. 5"}),
    params:
        code=code("workflow/scripts/plot_latency.py"),
    log:
        "results/{run}/logs/plot_latency.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/plot_latency.py"
