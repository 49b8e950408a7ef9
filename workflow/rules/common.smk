import math
import re
import os
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

# Rules call the `alloc-moe` console script; make the one next to this Python first on PATH (a venv that is not
# activated). Under --use-conda the env's own bin comes first.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

CAL = config.get("calibration", {})
CAL_DEFAULT = CAL.get("default", "balanced")
CAL_SETS = list(dict.fromkeys([CAL_DEFAULT, *CAL.get("sets", [CAL_DEFAULT])]))
SYNTHETIC_SETS = ("balanced", "language", "structured")
EVAL = config.get("evaluation", {})
PROFILE = config.get("profile", {})
ACC = config.get("accuracy", {})
K_BASE = config.get("k_base", 1)


def code(*entries):
    """Hash of the code a rule runs: the `alloc-moe` CLI plus the named alloc_moe modules, or a workflow script, each
    with the alloc_moe modules it imports (transitively). A rule re-runs when that code changes, and only then."""
    from alloc_moe.codehash import code_hash

    scripts = [str(Path(workflow.basedir, e)) for e in entries if e.endswith(".py")]
    modules = [e for e in entries if not e.endswith(".py")]
    return code_hash(scripts + (["alloc_moe.cli", *modules] if modules or not scripts else []),
                     package_dir=Path(workflow.basedir, "alloc_moe"))

# A run is one model at one seed: results/<model>-s<seed>/...
RUNS = {f"{name}-s{seed}": (name, seed) for name, spec in config["models"].items() for seed in spec.get("seeds", [0])}


def spec_of(run):
    return config["models"][RUNS[run][0]]


def plan_id(layer, token, kb, calib, budget):
    return f"{layer}__{token}__kb{kb}__{calib}__B{budget:g}"


def _calib_of(layer, token):
    """The calibration set a plan depends on: alloc-l's sensitivity, top-p/naee's routing scores; else none."""
    return CAL_DEFAULT if layer == "alloc-l" or token in ("top-p", "naee") else "none"


def plans_at(run, budget):
    """Every plan id the config asks for at one budget (deduplicated, config order)."""
    n_layers = num_moe_layers(run)
    ids = []
    for m in config["methods"]:
        ids.append(plan_id(m["layer"], m["token"], K_BASE, _calib_of(m["layer"], m["token"]), budget))
    for kb in config.get("k_base_sweep", []):
        if kb <= budget / n_layers + 1e-9:  # a larger K_base cannot be met by the budget (Table 2: n/a)
            ids.append(plan_id("uniform", "alloc-t", kb, "none", budget))
    if config.get("calibration_sweep", False):
        ids += [plan_id("alloc-l", "topk", K_BASE, c, budget) for c in CAL_SETS]
    return list(dict.fromkeys(ids))


def plan_ids(run):
    return [p for b in spec_of(run)["budgets"] for p in plans_at(run, b)]


def num_moe_layers(run):
    """MoE layers of a run's model, from its config (train/make) without building it."""
    spec = spec_of(run)
    if "train" in spec or "make" in spec:
        s = spec.get("train") or spec["make"]
        from alloc_moe import zoo

        cfg = zoo.make_config(s.get("arch", "deepseek_v2" if "train" in spec else None), topology=s.get("topology"),
                              layers=s.get("layers", 9 if "train" in spec else None),
                              width=s.get("width", "small" if "train" in spec else "tiny"))
        return cfg.num_hidden_layers - getattr(cfg, "first_k_dense_replace", 0)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(spec["path"])
    return cfg.num_hidden_layers - getattr(cfg, "first_k_dense_replace", 0)


def model_dir(wildcards):
    spec = spec_of(wildcards.run)
    return spec["path"] if "path" in spec else f"results/{wildcards.run}/model"


def model_input(wildcards):
    return [] if "path" in spec_of(wildcards.run) else f"results/{wildcards.run}/model"


def calib_file(name):
    return f"results/data/calib_{name}.jsonl" if name in SYNTHETIC_SETS else name


def calib_input(name):
    if name in SYNTHETIC_SETS:
        return [f"results/data/calib_{name}.jsonl"]
    return [name] if os.path.exists(name) else []


EVAL_TEXT = EVAL.get("text", "results/data/heldout.jsonl")
