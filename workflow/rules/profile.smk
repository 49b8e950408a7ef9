rule profile_ppl:
    input:
        model_input,
        lambda wc: calib_input(wc.calib),
    output:
        "results/{run}/sensitivity/ppl_{calib}.csv",
    params:
        model=model_dir,
        calib=lambda wc: calib_file(wc.calib),
        seq_len=PROFILE.get("seq_len", 64),
        max_tokens=PROFILE.get("max_tokens", 8192),
        batch_size=PROFILE.get("batch_size", 16),
        code=code("alloc_moe.stages.profile"),
    threads: 1
    resources:
        gpu=gpu_of_run,  # a real checkpoint loads on the GPU (--device auto)
        mem_mb=checkpoint_or(64000, 4000),
        runtime=checkpoint_or(240, 30),
    log:
        "results/{run}/logs/profile_ppl_{calib}.log",
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
        "results/{run}/sensitivity/lexi.csv",
    params:
        model=model_dir,
        code=code("alloc_moe.stages.profile"),
    threads: 1
    resources:
        gpu=gpu_of_run,  # a real checkpoint loads on the GPU (--device auto)
        mem_mb=checkpoint_or(64000, 4000),
        runtime=checkpoint_or(60, 30),
    log:
        "results/{run}/logs/profile_lexi.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe profile --method lexi --model {params.model} --threads {threads} --no-progress "
        "--out {output} > {log} 2>&1"


rule routing_scores:
    input:
        model_input,
        lambda wc: calib_input(wc.calib),
    output:
        "results/{run}/routing/{calib}.pt",
    params:
        model=model_dir,
        calib=lambda wc: calib_file(wc.calib),
        seq_len=PROFILE.get("seq_len", 64),
        max_tokens=PROFILE.get("max_tokens", 8192),
        batch_size=PROFILE.get("batch_size", 16),
        code=code("alloc_moe.stages.routing_scores"),
    threads: 1
    resources:
        gpu=gpu_of_run,  # a real checkpoint loads on the GPU (--device auto)
        mem_mb=checkpoint_or(64000, 4000),
        runtime=checkpoint_or(60, 30),
    log:
        "results/{run}/logs/routing_{calib}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe routing --model {params.model} --calib {params.calib} --seq-len {params.seq_len} "
        "--max-tokens {params.max_tokens} --batch-size {params.batch_size} --threads {threads} --no-progress "
        "--out {output} > {log} 2>&1"
