"""workflow/rules/latency.smk and load_balance.smk on a copy of the workflow whose schema has the proposed additions
(the lead wires them into the Snakefile): the DAG resolves, and on a tiny model both stages write their tables."""

import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from test_workflow import ROOT, SNAKEMAKE, TINY  # the end-to-end workflow test's tiny config

CONFIG = TINY + """
latency: {device: cpu, dtype: float32, batch: 2, prompt: 8, decode: 2, warmup: 0, runs: 2}
load_balance: {figure_plan: alloc-l__alloc-t__B4}
"""

SNAKEFILE = """
configfile: "config/config.yaml"
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/plans.smk"
include: "workflow/rules/latency.smk"
include: "workflow/rules/load_balance.smk"

rule all:
    input:
        "results/summary/latency.csv",
        "results/summary/load_balance.csv",
        expand("results/{model}/figures/{f}.png", model=MODELS,
               f=["speedup_vs_budget", "expert_load", "load_balance_by_layer", "plan_allocation", "experts_vs_entropy"]),
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    if not SNAKEMAKE.exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")
    work = tmp_path_factory.mktemp("wf")
    shutil.copytree(ROOT / "workflow", work / "workflow")
    shutil.copytree(ROOT / "envs", work / "envs")
    schema_path = work / "workflow/schemas/config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    schema["properties"].update(yaml.safe_load((ROOT / "workflow/schemas/latency-load-balance.schema-additions.yaml").read_text()))
    schema_path.write_text(yaml.safe_dump(schema))
    (work / "config").mkdir()
    (work / "config/config.yaml").write_text(CONFIG)
    (work / "Snakefile").write_text(SNAKEFILE)
    return work


def _snakemake(work, *args):
    return subprocess.run([str(SNAKEMAKE), "--directory", str(work), "--snakefile", str(work / "Snakefile"), *args],
                          capture_output=True, text=True, timeout=600)


def test_dag_resolves(work):
    res = _snakemake(work, "--dry-run", "--quiet", "rules")
    assert res.returncode == 0, res.stderr[-3000:]
    for rule in ("latency", "load_balance", "summarize_latency", "summarize_load_balance", "plot_latency", "plot_load_balance"):
        assert rule in res.stdout


@pytest.mark.slow
def test_stages_write_their_tables(work):
    res = _snakemake(work, "--cores", "2", "--quiet")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lat = pd.read_csv(work / "results/summary/latency.csv")
    assert set(lat["phase"]) == {"prefill", "decode"} and set(lat["model"]) == {"tiny"}
    assert len(lat) == 7 * 2  # original + 3 methods x 2 budgets, two phases
    lb = pd.read_csv(work / "results/summary/load_balance.csv")
    assert set(lb["plan"]) == {f"{m}__B{b}" for m in ("uniform__topk", "alloc-l__alloc-t", "lexi__topk") for b in (4, 5)}
    per_token = lb[lb.metric == "experts_per_token"].groupby("plan")["value"].mean()  # realised budget / layers
    for plan, value in per_token.items():
        assert value == pytest.approx(int(plan.rsplit("B", 1)[1]) / 3, abs=0.01)
