import sys

sys.stderr = open(snakemake.log[0], "w")

from pathlib import Path

from alloc_moe.harness.manifest import write_manifest

out = Path(snakemake.output[0])  # <run dir>/summary/manifest.json
write_manifest(out.parent.parent, snakemake.config, files=list(snakemake.input))
