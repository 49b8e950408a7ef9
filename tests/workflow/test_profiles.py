"""Cluster profiles: `snakemake -n --profile workflow/profiles/X` loads and resolves the DAG with per-rule resources.

Needs the executor plugins (pip install -e ".[cluster]"); skipped with the reason otherwise.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
PLUGINS = {"slurm": ["snakemake_executor_plugin_slurm"],
           "kubernetes": ["snakemake_executor_plugin_kubernetes", "snakemake_storage_plugin_fs"]}
GPU_RULES = {"train", "profile_ppl", "profile_lexi", "routing_scores", "latency", "load_balance"}


def _dry_run(profile: str, workdir: Path, *extra: str) -> str:
    missing = [m for m in PLUGINS[profile] if importlib.util.find_spec(m) is None]
    if missing or not SNAKEMAKE.exists():
        pytest.skip(f"needs {', '.join(missing) or 'snakemake'}: pip install -e '.[cluster]'")
    (workdir / "config").mkdir(exist_ok=True)
    shutil.copy(ROOT / "config/config.yaml", workdir / "config/config.yaml")
    res = subprocess.run([str(SNAKEMAKE), "-n", "--profile", str(ROOT / "workflow/profiles" / profile),
                          "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *extra],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _resources(log: str) -> dict[str, dict[str, str]]:
    """rule -> its resources line (the last job of the rule wins; they agree per rule)."""
    out, rule = {}, None
    for line in log.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        m = re.match(r"^\s+resources: (.*)", line)
        if m and rule:
            out[rule] = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
    return out


@pytest.mark.slow  # a full dry run of the embedded default per profile: 20-30 s each under load
@pytest.mark.parametrize("profile", ["slurm", "kubernetes"])
def test_profile_loads_and_maps_gpu_memory_runtime(profile, tmp_path):
    extra = ["--default-storage-prefix", str(tmp_path / "store")] if profile == "kubernetes" else []
    (tmp_path / "work").mkdir()
    log = _dry_run(profile, tmp_path / "work", *extra)
    total = re.search(r"^total\s+(\d+)", log, re.M)
    assert total and int(total.group(1)) > 10, log[-2000:]
    res = _resources(log)
    assert GPU_RULES <= set(res), sorted(res)
    for rule, r in res.items():
        assert r["gpu"] == ("1" if rule in GPU_RULES else "0"), (rule, r)
        assert int(r["mem_mb"]) > 0 and int(r["runtime"]) > 0, (rule, r)
    assert res["profile_ppl"]["runtime"] == "240" and res["train"]["mem_mb"] == "64000"
    assert res["plan"]["mem_mb"] == "2000"
    assert res["all"]["mem_mb"] == "4000" and res["all"]["runtime"] == "30"  # a rule the profile does not name
    if profile == "kubernetes":
        assert res["train"]["gpu_manufacturer"] == "nvidia"
