rule calibration_set:
    output:
        "results/data/calib_{name}.jsonl",
    wildcard_constraints:
        name="balanced|language|structured",
    params:
        docs=CAL.get("docs_per_family", 40),
        corpus=CORPUS,
        code=code("alloc_moe.data.synthetic"),
    log:
        "results/logs/calib_{name}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-corpus --calibration-set {wildcards.name} --docs-per-family {params.docs} --corpus {params.corpus} "
        "--out {output} > {log} 2>&1"


rule heldout_text:
    output:
        "results/data/heldout.jsonl",
    params:
        docs=EVAL.get("docs_per_family", 20),
        corpus=CORPUS,
        code=code("alloc_moe.data.synthetic"),
    log:
        "results/logs/heldout_text.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-corpus --seed 7 --split heldout --docs-per-family {params.docs} --corpus {params.corpus} "
        "--out {output} > {log} 2>&1"


# One folder per suite version (embedded-v1, embedded-v2; `tasks: embedded` means the current one, common.smk).
rule embedded_tasks:
    output:
        directory("results/tasks/{suite}"),
    wildcard_constraints:
        suite=r"embedded-v[0-9]+",
    params:
        code=code("alloc_moe.data.tasks.embedded"),
    log:
        "results/logs/embedded_tasks_{suite}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-tasks --version {wildcards.suite} --out {output} > {log} 2>&1"


# Hub text sources (WikiText2 / C4 / Pile at the revisions pinned in alloc_moe.data.text.SOURCES) as calibration or
# evaluation JSONL with a sha256 sidecar; `download.local.<source>_<split>` reads a local copy instead (offline).
# Runs on the machine that starts the workflow (localrules): cluster nodes often have no network.
localrules: download


rule download:
    input:
        lambda wc: DOWNLOAD.get("local", {}).get(f"{wc.source}_{wc.split}", []),
    output:
        data="results/data/{source}_{split}.jsonl",
        meta="results/data/{source}_{split}.meta.json",
    wildcard_constraints:
        source="|".join(SOURCES),
        split="[a-z]+",
    params:
        local=lambda wildcards, input: f"--local {input[0]}" if input else "",
        max_chars=f"--max-chars {DOWNLOAD['max_chars']}" if DOWNLOAD.get("max_chars") else "",
        code=code("alloc_moe.data.download"),
    log:
        "results/logs/download_{source}_{split}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe download --dataset {wildcards.source} --split {wildcards.split} {params.local} {params.max_chars} "
        "--out {output.data} > {log} 2>&1"
