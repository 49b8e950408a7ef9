"""Cluster profiles: `snakemake -n --profile workflow/profiles/X` loads and resolves the DAG with per-rule resources;
every config in config/ means the same merged over the embedded default (a plain --configfile, as cluster jobs see
it) as on its own.

The dry runs need the executor plugins (pip install -e ".[cluster]"); skipped with the reason otherwise. The SLURM
profile also runs for real: tests/workflow/test_slurm.py. The Kubernetes profile only dry-runs: no cluster can be
installed on these machines from the package registries (docs/guides/clusters-containers.md).
"""

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import OFFLINE

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
PLUGINS = {"slurm": ["snakemake_executor_plugin_slurm"],
           "kubernetes": ["snakemake_executor_plugin_kubernetes", "snakemake_storage_plugin_fs"]}
# rules that load a run's model: gpu / mem_mb / runtime are their own (a real checkpoint: GPU sizes; else CPU sizes)
MODEL_RULES = {"profile_ppl", "profile_lexi", "routing_scores", "latency", "load_balance"}


def _dry_run(profile: str, workdir: Path, *extra: str, env: dict | None = None) -> str:
    missing = [m for m in PLUGINS[profile] if importlib.util.find_spec(m) is None]
    if missing or not SNAKEMAKE.exists():
        pytest.skip(f"needs {', '.join(missing) or 'snakemake'}: pip install -e '.[cluster]'")
    (workdir / "config").mkdir(exist_ok=True)
    shutil.copy(ROOT / "config/config.yaml", workdir / "config/config.yaml")
    res = subprocess.run([str(SNAKEMAKE), "-n", "--profile", str(ROOT / "workflow/profiles" / profile),
                          "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *extra],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _resources(log: str) -> dict[str, dict[str, str]]:
    """rule -> its resources line (the last job of the rule wins; they agree per rule)."""
    out, rule = {}, None
    for line in log.splitlines():
        m = re.match(r"^\s*(?:local)?rule (\w+):", line)  # indented: a member of a group job
        if m:
            rule = m.group(1)
        m = re.match(r"^\s+resources: (.*)", line)
        if m and rule:
            out[rule] = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
    return out


@pytest.mark.slow  # a full dry run of the embedded default per profile: 20-30 s each under load
@pytest.mark.parametrize("profile", ["slurm", "kubernetes"])
def test_profile_loads_and_maps_gpu_memory_runtime(profile, tmp_path):
    """The embedded default is a CPU workflow: no job asks for a GPU, none for more than a small node has."""
    extra = ["--default-storage-prefix", str(tmp_path / "store")] if profile == "kubernetes" else []
    (tmp_path / "work").mkdir()
    log = _dry_run(profile, tmp_path / "work", *extra)
    total = re.search(r"^total\s+(\d+)", log, re.M)
    assert total and int(total.group(1)) > 10, log[-2000:]
    res = _resources(log)
    assert MODEL_RULES | {"train"} <= set(res), sorted(res)
    for rule, r in res.items():
        assert r["gpu"] == "0", (rule, r)
        assert 0 < int(r["mem_mb"]) <= 8000 and 0 < int(r["runtime"]) <= 240, (rule, r)
    for rule in MODEL_RULES:
        assert (res[rule]["mem_mb"], res[rule]["runtime"]) == ("4000", "30"), rule
    assert res["train"]["mem_mb"] == "8000" and res["plan"]["mem_mb"] == "2000"
    assert res["all"]["mem_mb"] == "4000" and res["all"]["runtime"] == "30"  # a rule the profile does not name
    if profile == "kubernetes":
        assert {r["gpu_manufacturer"] for r in res.values()} == {"nvidia"}  # plugin 0.5.1 refuses a gpu without it


@pytest.mark.slow  # a dry run of config/smoke.yaml (68 jobs)
def test_slurm_profile_asks_checkpoint_jobs_for_a_gpu(tmp_path):
    """Real checkpoints (config/smoke.yaml, offline): the rules' own GPU sizes reach the jobs, the profile adds its
    status command, thread counts and groups."""
    log = _dry_run("slurm", tmp_path, "--configfile", str(ROOT / "config/smoke.yaml"), env=OFFLINE)
    res = _resources(log)
    assert MODEL_RULES <= set(res), sorted(res)
    for rule in MODEL_RULES:
        assert res[rule]["gpu"] == "1" and res[rule]["mem_mb"] == "64000", (rule, res[rule])
    assert res["profile_ppl"]["runtime"] == "240" and res["latency"]["runtime"] == "60"
    accuracy = [r for rule, r in res.items() if rule.startswith("accuracy")]
    assert accuracy and all(r["gpu"] == "1" and r["mem_mb"] == "64000" for r in accuracy)
    assert res["plan"]["gpu"] == "0" and res["plan"]["mem_mb"] == "2000"
    settings = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    assert settings["slurm-status-command"] == "squeue" and settings["show-failed-logs"] is True
    assert settings["set-threads"] == {"train": 2, "latency": 2} and settings["cores"] >= 2


# ---- merge-safe configs: Snakemake merges --configfile over the embedded default (cluster jobs always do) ----

WHOLE = ["ci.yaml", "paper.yaml", "smoke.yaml"]  # configs that stand for a whole run
OVERLAYS = ["fidelity.yaml", "vllm.yaml", "suite-v3.yaml"]  # meant as changes of the embedded default


def _effective(cfg: dict) -> dict:
    """The config the workflow resolves: null models dropped, the schema's defaults filled in (common.smk)."""
    from snakemake.utils import validate

    cfg = copy.deepcopy(cfg)
    cfg["models"] = {k: v for k, v in cfg.get("models", {}).items() if v is not None}
    validate(cfg, str(ROOT / "workflow/schemas/config.schema.yaml"))
    return cfg


def _merged(name: str) -> dict:
    from snakemake.utils import update_config

    merged = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    update_config(merged, yaml.safe_load((ROOT / "config" / name).read_text()))
    return _effective(merged)


def test_every_config_file_is_listed():
    listed = set(WHOLE) | set(OVERLAYS) | {"config.yaml", "ci-tolerance.yaml"}
    assert {p.name for p in (ROOT / "config").glob("*.yaml")} == listed


@pytest.mark.parametrize("name", WHOLE)
def test_whole_config_is_merge_safe(name):
    """Merged over config/config.yaml (a plain --configfile, and what every cluster job does: Snakemake 9.27 does not
    pass --replace-workflow-config on to them) it resolves to the same config as on its own."""
    pytest.importorskip("snakemake")
    alone = _effective(yaml.safe_load((ROOT / "config" / name).read_text()))
    assert _merged(name) == alone
    assert "embedded" not in alone["models"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_config_changes_the_embedded_default(name):
    pytest.importorskip("snakemake")
    merged, default = _merged(name), _effective(yaml.safe_load((ROOT / "config/config.yaml").read_text()))
    assert set(merged["models"]) == {"embedded"} and merged != default


def test_no_command_relies_on_replace_workflow_config():
    files = [*ROOT.glob("config/*"), *ROOT.glob("docs/**/*.md"), ROOT / "README.md", *ROOT.glob("workflow/**/*.yaml"),
             *ROOT.glob(".ci/*"), *ROOT.glob("tests/**/*.py")]
    command = re.compile(r"snakemake [^`\n]*--replace-workflow-config")  # a command line using it (prose may name it)
    users = [str(f.relative_to(ROOT)) for f in files if f.is_file() and command.search(f.read_text(errors="replace"))]
    assert not users, users
