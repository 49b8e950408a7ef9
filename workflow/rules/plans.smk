def _sensitivity(wildcards):
    # only alloc-l needs Algorithm 1; the data-free methods read layers and K_orig from the cheap LExI profile
    name = "ppl" if wildcards.layer == "alloc-l" else "lexi"
    return f"results/{wildcards.model}/sensitivity/{name}.csv"


rule plan:
    input:
        _sensitivity,
    output:
        "results/{model}/plans/{layer}__{token}__B{budget}.json",
    wildcard_constraints:
        layer="alloc-l|uniform|ascending|descending|lexi",
        token="topk|alloc-t",
        budget=r"[0-9.]+",
    params:
        k_base=config.get("k_base", 1),
        normalization=config.get("normalization", "relative"),
        model=model_dir,
        exact="--exact-budget" if config.get("exact_budget", False) else "",
        pkg=PKG,
    log:
        "results/{model}/logs/plan_{layer}__{token}__B{budget}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe plan --sensitivity {input} --method {wildcards.layer} --token-allocation {wildcards.token} "
        "--budget {wildcards.budget} --k-base {params.k_base} --normalization {params.normalization} "
        "{params.exact} --model {params.model} --out {output} > {log} 2>&1"
