rule profile_ppl:
    input:
        model_input,
        corpus_input("calibration"),
    output:
        "results/{model}/sensitivity/ppl.csv",
    params:
        model=model_dir,
        calib=corpus_file("calibration"),
        seq_len=config["profile"].get("seq_len", 128),
        max_tokens=config["profile"].get("max_tokens", 8192),
        batch_size=config["profile"].get("batch_size", 8),
        pkg=PKG,
    threads: THREADS
    resources:
        gpu=0,
    log:
        "results/{model}/logs/profile_ppl.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe profile --model {params.model} --calib {params.calib} --seq-len {params.seq_len} "
        "--max-tokens {params.max_tokens} --batch-size {params.batch_size} --threads {threads} --no-progress "
        "--out {output} > {log} 2>&1"


rule profile_lexi:
    input:
        model_input,
    output:
        "results/{model}/sensitivity/lexi.csv",
    params:
        model=model_dir,
        pkg=PKG,
    threads: THREADS
    log:
        "results/{model}/logs/profile_lexi.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe profile --method lexi --model {params.model} --threads {threads} --no-progress "
        "--out {output} > {log} 2>&1"
