rule calibration_set:
    output:
        "results/data/calib_{name}.jsonl",
    wildcard_constraints:
        name="balanced|language|structured",
    params:
        docs=CAL.get("docs_per_family", 40),
        code=code("alloc_moe.synthetic"),
    log:
        "results/logs/calib_{name}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-corpus --calibration-set {wildcards.name} --docs-per-family {params.docs} --out {output} > {log} 2>&1"


rule heldout_text:
    output:
        "results/data/heldout.jsonl",
    params:
        docs=EVAL.get("docs_per_family", 20),
        code=code("alloc_moe.synthetic"),
    log:
        "results/logs/heldout_text.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-corpus --seed 7 --split heldout --docs-per-family {params.docs} --out {output} > {log} 2>&1"


rule embedded_tasks:
    output:
        directory("results/tasks/embedded"),
    params:
        code=code("alloc_moe.tasks.embedded"),
    log:
        "results/logs/embedded_tasks.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-tasks --out {output} > {log} 2>&1"
