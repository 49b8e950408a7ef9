def _make_args(wildcards):
    spec = config["models"][wildcards.model]["make"]
    flags = {"arch": "--arch", "topology": "--topology", "layers": "--layers", "width": "--width",
             "router_std": "--router-std", "seed": "--seed"}
    return " ".join(f"{flags[k]} {v}" for k, v in spec.items())


rule make_model:
    output:
        directory("results/{model}/model"),
    params:
        args=_make_args,
        pkg=PKG,
    log:
        "results/{model}/logs/make_model.log",
    conda:
        "../../envs/alloc-moe.yaml"
    shell:
        "alloc-moe make-model {params.args} --overwrite --out {output} > {log} 2>&1"
