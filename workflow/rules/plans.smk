rule plan:
    input:
        unpack(_plan_inputs),
    output:
        "results/{run}/plans/{layer}__{token}__kb{kb}__{calib}__B{budget}.json",
    wildcard_constraints:
        layer="alloc-l|uniform|ascending|descending|lexi",
        token="topk|alloc-t|top-p|naee",
        kb=r"[0-9]+",
        budget=r"[0-9.]+",
    # before any accuracy job (priority = its plan count, accuracy.smk): every plan is done, so the accuracy jobs are
    # ready together and start longest first, instead of in the order their plans happened to finish
    priority: 100
    params:
        routing=lambda wc, input: f"--routing-scores {input.routing}" if "routing" in input.keys() else "",
        normalization=config.get("normalization", "relative"),
        model=model_dir,
        exact="--exact-budget" if config.get("exact_budget", False) else "",
        code=code("alloc_moe.stages.plan"),
    log:
        "results/{run}/logs/plan_{layer}__{token}__kb{kb}__{calib}__B{budget}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe plan --sensitivity {input.sensitivity} {params.routing} --method {wildcards.layer} "
        "--token-allocation {wildcards.token} --budget {wildcards.budget} --k-base {wildcards.kb} "
        "--normalization {params.normalization} {params.exact} --model {params.model} --calibration {wildcards.calib} "
        "--out {output} > {log} 2>&1"
