# Latency stage (paper 4.2 / Fig. 5, Appendix A.2): prefill and decode latency of the original model and its plans,
# interleaved run by run in one process, with the ideal speedup (only the expert GEMMs shrink) next to it.
# Settings: the top-level `latency:` config key (see the README's latency section for the schema).
_LAT = config.get("latency", {})
_LAT_DEVICE = str(_LAT.get("device", "cpu"))


def _latency_plans(wildcards):
    ids = _LAT.get("plans") or plan_ids(wildcards.model)
    return expand("results/{model}/plans/{plan}.json", model=wildcards.model, plan=ids)


rule latency:
    input:
        model_input,
        plans=_latency_plans,
    output:
        table="results/{model}/latency/latency.csv",
        summary="results/{model}/latency/latency.json",
    params:
        model=model_dir,
        backend=_LAT.get("backend", "hf"),
        batch=_LAT.get("batch", 8),
        prompt=_LAT.get("prompt", 32),
        decode=_LAT.get("decode", 128),
        warmup=_LAT.get("warmup", 5),
        runs=_LAT.get("runs", 10),
        device=_LAT_DEVICE,
        dtype=_LAT.get("dtype", "auto"),
        pkg=PKG,
    threads: THREADS
    resources:
        gpu=1 if _LAT_DEVICE.startswith("cuda") else 0,
    log:
        "results/{model}/logs/latency.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe latency --model {params.model} --plans original {input.plans} --backend {params.backend} "
        "--batch {params.batch} --prompt {params.prompt} --decode {params.decode} --warmup {params.warmup} "
        "--runs {params.runs} --device {params.device} --dtype {params.dtype} --threads {threads} "
        "--out {output.table} --summary {output.summary} > {log} 2>&1"


rule summarize_latency:
    input:
        expand("results/{model}/latency/latency.json", model=MODELS),
    output:
        "results/summary/latency.csv",
    params:
        models=MODELS,
        pkg=PKG,
    log:
        "results/logs/summarize_latency.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/summarize_latency.py"


rule plot_latency:
    input:
        "results/{model}/latency/latency.json",
    output:
        "results/{model}/figures/speedup_vs_budget.png",
    params:
        pkg=PKG,
    log:
        "results/{model}/logs/plot_latency.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/plot_latency.py"
