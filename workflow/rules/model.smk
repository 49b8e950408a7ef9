rule train:
    output:
        directory("results/{run}/model"),
    wildcard_constraints:
        run="|".join(re.escape(r) for r in RUNS if "train" in spec_of(r)) or "NO_TRAINED_MODEL",
    params:
        args=_train_args,
        seed=lambda wc: RUNS[wc.run][1],
        code=code("alloc_moe.data.train"),
    threads: lambda wildcards: workflow.cores
    log:
        "results/{run}/logs/train.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe train {params.args} --seed {params.seed} --threads {threads} --no-progress --overwrite "
        "--out {output} > {log} 2>&1"


rule make_model:
    output:
        directory("results/{run}/model"),
    wildcard_constraints:
        run="|".join(re.escape(r) for r in RUNS if "make" in spec_of(r)) or "NO_ZOO_MODEL",
    params:
        args=_make_args,
        seed=lambda wc: RUNS[wc.run][1],
        code=code("alloc_moe.data.zoo"),
    log:
        "results/{run}/logs/make_model.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-model {params.args} --seed {params.seed} --overwrite --out {output} > {log} 2>&1"


# The latency twin of a run's model (`latency.model: twin`): same architecture, layers, experts and top-k at the
# `latency.twin` width, random weights from the run's seed. Only the latency rule reads it.
rule make_twin:
    input:
        model_input,
    output:
        directory("results/{run}/twin"),
    params:
        model=model_dir,
        width=lambda wc: f"--hidden-size {LAT_TWIN['hidden_size']} --expert-size {LAT_TWIN['expert_size']}",
        seed=lambda wc: RUNS[wc.run][1],
        code=code("alloc_moe.data.twin"),
    log:
        "results/{run}/logs/make_twin.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-twin --model {params.model} {params.width} --seed {params.seed} --overwrite "
        "--out {output} > {log} 2>&1"
