_EVAL = config["evaluation"]


rule ppl_original:
    input:
        model_input,
        corpus_input("evaluation"),
    output:
        "results/{model}/eval/original.json",
    params:
        model=model_dir,
        data=corpus_file("evaluation"),
        seq_len=_EVAL["seq_len"],
        max_tokens=_EVAL["max_tokens"],
        batch_size=_EVAL["batch_size"],
        pkg=PKG,
    threads: THREADS
    log:
        "results/{model}/logs/ppl_original.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe ppl --model {params.model} --calib {params.data} --seq-len {params.seq_len} "
        "--max-tokens {params.max_tokens} --batch-size {params.batch_size} --threads {threads} --no-progress "
        "--out {output} > {log} 2>&1"


rule ppl_plan:
    input:
        model_input,
        corpus_input("evaluation"),
        plan="results/{model}/plans/{plan}.json",
    output:
        "results/{model}/eval/{plan}.json",
    wildcard_constraints:
        plan=r"[a-z-]+__[a-z-]+__B[0-9.]+",
    params:
        model=model_dir,
        data=corpus_file("evaluation"),
        seq_len=_EVAL["seq_len"],
        max_tokens=_EVAL["max_tokens"],
        batch_size=_EVAL["batch_size"],
        pkg=PKG,
    threads: THREADS
    log:
        "results/{model}/logs/ppl_{plan}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe ppl --model {params.model} --plan {input.plan} --calib {params.data} --seq-len {params.seq_len} "
        "--max-tokens {params.max_tokens} --batch-size {params.batch_size} --threads {threads} --no-progress "
        "--out {output} > {log} 2>&1"
