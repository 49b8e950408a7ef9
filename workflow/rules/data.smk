rule corpus:
    output:
        "results/corpus/{split}.jsonl",
    wildcard_constraints:
        split="calibration|evaluation",
    params:
        seed=lambda wc: CORPUS.get(f"{wc.split}_seed", 1 if wc.split == "calibration" else 2),
        docs=CORPUS.get("docs_per_family", 60),
        pkg=PKG,
    log:
        "results/logs/corpus_{split}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-corpus --seed {params.seed} --docs-per-family {params.docs} --out {output} > {log} 2>&1"
