# Manifest (docs/guides/reproducibility.md): results/summary/manifest.json ties every summary table to the resolved
# config (and its hash), the git commit, package versions and hardware, with the sha256 of each table it covers.
# It is written after the last summary table and again whenever one of them, the config or its code changes.
from alloc_moe.harness.manifest import config_hash

MANIFEST_TABLES = ["accuracy", "perplexity", "latency", "load_balance"]


rule manifest:
    input:
        expand("results/summary/{table}.csv", table=MANIFEST_TABLES),
    output:
        "results/summary/manifest.json",
    params:
        config_hash=config_hash(config),
        code=code("workflow/scripts/write_manifest.py"),
    log:
        "results/logs/manifest.log",
    conda:
        "../../envs/alloc-moe.yaml"
    script:
        "../scripts/write_manifest.py"
