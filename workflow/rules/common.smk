import hashlib
import os
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

# Rules call the `alloc-moe` console script; make the one next to this Python first on PATH (a venv that is not
# activated). Under --use-conda the env's own bin comes first.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

MODELS = list(config["models"])
CORPUS = config.get("corpus", {})
THREADS = config.get("threads", 2)


def _package_hash():
    """Content hash of the alloc_moe sources: an edit of the package re-runs the rules that use it."""
    h = hashlib.sha256()
    for p in sorted(Path(workflow.basedir, "alloc_moe").rglob("*")):
        if p.suffix in (".py", ".json"):
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


PKG = _package_hash()


def plan_id(layer, token, budget):
    return f"{layer}__{token}__B{budget:g}"


def plan_ids(model):
    return [plan_id(m["layer"], m["token"], b) for m in config["methods"] for b in config["models"][model]["budgets"]]


def model_dir(wildcards):
    spec = config["models"][wildcards.model]
    return spec["path"] if "path" in spec else f"results/{wildcards.model}/model"


def model_input(wildcards):
    spec = config["models"][wildcards.model]
    return [] if "path" in spec else f"results/{wildcards.model}/model"


def corpus_file(split):
    src = CORPUS.get(split)
    return src if src else f"results/corpus/{split}.jsonl"


def corpus_input(split):
    src = CORPUS.get(split)
    return [src] if src and os.path.exists(src) else ([] if src else [f"results/corpus/{split}.jsonl"])
