# Accuracy (lm-eval) and perplexity per family for every plan: one job per (run, label), where label is `original`
# or a budget `B<b>`, evaluating all of that budget's plans in one process (the model and the tasks load once; one
# job per plan would load them 53 times in the embedded default, ~5 min more on 2 cores). Snakemake has no output
# functions, so a job whose plan list comes from the config writes a folder, results/<run>/eval/<label>/, holding one
# <plan>.json per plan (`original.json` for the original model). Each finished plan is checkpointed in
# results/<run>/eval/.partial-<label>/ (not a declared output, so Snakemake keeps it when it deletes a killed job's
# outputs; removed once the job's outputs are written): the rerun evaluates only the plans that had not finished
# (alloc_moe/harness/resume.py). Input and parameter functions: common.smk.


rule accuracy:
    input:
        plans=_eval_plan_files,
        model=model_input,
        tasks=_eval_task_input,
        text=_eval_text_input,
    output:
        directory("results/{run}/eval/{label}"),
    wildcard_constraints:
        label=r"original|B[0-9.]+",
    params:
        model=model_dir,  # a staged snapshot folder, hub id@revision, a local or a trained model
        pairs=_eval_pairs,
        args=_eval_args,
        code=code("alloc_moe.stages.accuracy"),
    threads: 1
    # longest first: a job's time is about its plan count (12-14 in the embedded default). Of the jobs that are ready
    # together the scheduler starts the highest priority (the plan jobs' priority, above these, makes them ready
    # together), so the shortest runs last instead of one core idling while the longest finishes alone. Not a rerun
    # trigger.
    priority: lambda wildcards: len(eval_plans(wildcards.run, wildcards.label))
    resources:  # a real checkpoint (path:) evaluates on a GPU; the embedded model on CPU
        gpu=gpu_of_run,
        mem_mb=checkpoint_or(64000, 4000),
        runtime=checkpoint_or(360, 30),
    log:
        "results/{run}/logs/accuracy_{label}.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe eval --model {params.model} {params.pairs} {params.args} "
        "--resume-dir results/{wildcards.run}/eval/.partial-{wildcards.label} --threads {threads} > {log} 2>&1"
