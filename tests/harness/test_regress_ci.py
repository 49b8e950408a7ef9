"""CI's regression check: the reduced embedded default (config/ci.yaml), run with the real Snakefile, matches its
committed reference (results/reference/ci) within config/ci-tolerance.yaml; planted regressions are caught; the
manifest rule hashes every summary table and re-runs when a table or the config changes."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from alloc_moe.cli import main
from alloc_moe.harness.regress import load_tolerances

pytestmark = [pytest.mark.slow, pytest.mark.workflow]  # the module's run: the CI config, trained and evaluated

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
REFERENCE = ROOT / "results/reference/ci"
TOLERANCE = ROOT / "config/ci-tolerance.yaml"
TABLES = ["accuracy.csv", "latency.csv", "load_balance.csv", "perplexity.csv"]
TARGET = "results/summary/manifest.json"  # the summary tables and their manifest (no figures: CI compares numbers)


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    if not SNAKEMAKE.exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")
    return subprocess.run([str(SNAKEMAKE), TARGET, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
                           "--cores", "1", *args], check=False, capture_output=True, text=True, timeout=900)


def _jobs(res: subprocess.CompletedProcess) -> set[str]:
    """The rules a snakemake run executed (its 'Job stats' table)."""
    out = res.stdout + res.stderr
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", table, re.MULTILINE) if m.group(1) != "total"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The reduced default run from scratch, as .ci/regress-reference runs it (1 core: training is deterministic
    per thread count)."""
    work = tmp_path_factory.mktemp("ci")
    (work / "config").mkdir()
    shutil.copy(ROOT / "config/ci.yaml", work / "config/config.yaml")
    res = _snakemake(work, "--quiet")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return work


def regress(capsys, baseline, current, *extra):
    code = main(["regress", "--baseline", str(baseline), "--current", str(current), "--tolerance", str(TOLERANCE),
                 *map(str, extra)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _copy_summary(work: Path, dest: Path) -> Path:
    shutil.copytree(work / "results/summary", dest / "summary", ignore=shutil.ignore_patterns("figures", "tables"))
    return dest / "summary"


def test_fresh_run_matches_the_reference(work, tmp_path, capsys):
    code, out, err = regress(capsys, REFERENCE, work / "results", "--out", tmp_path / "report.csv")
    assert code == 0, out + err
    report = pd.read_csv(tmp_path / "report.csv")
    assert set(report.table) == set(TABLES)
    assert set(report.status) == {"ok"}, report[report.status != "ok"]  # no row missing, new or moved
    n_rows = sum(len(pd.read_csv(REFERENCE / "summary" / t)) for t in TABLES)
    assert len(report) == n_rows


def test_manifest_hashes_every_summary_table(work):
    summary = work / "results/summary"
    manifest = json.loads((summary / "manifest.json").read_text())
    assert sorted(manifest["files"]) == TABLES
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((summary / name).read_bytes()).hexdigest() == digest, name
    reference = json.loads((REFERENCE / "summary/manifest.json").read_text())
    assert manifest["config_hash"] == reference["config_hash"]
    assert manifest["config"]["models"]["ci"]["train"]["steps"] == yaml.safe_load(
        (ROOT / "config/ci.yaml").read_text())["models"]["ci"]["train"]["steps"]
    assert manifest["git_commit"] and manifest["torch"] and manifest["packages"]["snakemake"]
    assert manifest["hardware"]["cpu_count"] >= 1


def test_reference_manifest_matches_its_tables():
    summary = REFERENCE / "summary"
    manifest = json.loads((summary / "manifest.json").read_text())
    assert {n: hashlib.sha256((summary / n).read_bytes()).hexdigest() for n in TABLES} == manifest["files"]
    assert manifest["git_commit"] and not manifest["git_commit"].endswith("+dirty")


def test_planted_accuracy_drop_is_caught_and_named(work, tmp_path, capsys):
    """Two items of 24 (8.3 points) on one task of one plan."""
    summary = _copy_summary(work, tmp_path)
    acc = pd.read_csv(summary / "accuracy.csv", dtype=str, keep_default_na=False)
    row = acc.index[(acc.layer_method == "alloc-l") & (acc.token_allocation == "alloc-t")
                    & (acc.value.astype(float) >= 10)][0]
    acc.loc[row, "value"] = f"{float(acc.loc[row, 'value']) - 200 / 24:.6f}"
    acc.to_csv(summary / "accuracy.csv", index=False)
    code, out, _ = regress(capsys, REFERENCE, tmp_path)
    assert code == 1
    assert f"task={acc.loc[row, 'task']}" in out and "layer_method=alloc-l" in out and "regressed" in out
    assert "1 regressed" in out
    assert "current: accuracy.csv no longer match(es) the sha256" in out  # the edit is visible in the notes too


def test_one_item_flipped_passes(work, tmp_path, capsys):
    """A near-tie decided differently on another CPU: one item of 24 either way is within the CI tolerance."""
    summary = _copy_summary(work, tmp_path)
    acc = pd.read_csv(summary / "accuracy.csv", dtype=str, keep_default_na=False)
    value = float(acc.loc[0, "value"])
    acc.loc[0, "value"] = f"{value + (100 / 24 if value < 50 else -100 / 24):.6f}"
    acc.to_csv(summary / "accuracy.csv", index=False)
    assert regress(capsys, REFERENCE, tmp_path)[0] == 0


@pytest.mark.parametrize("factor", [1.05, 1.002, 0.998])
def test_planted_perplexity_change_is_caught_and_named(work, tmp_path, capsys, factor):
    """+5% (a broken router) and +-0.2% (a small change of method): both fail, either way."""
    summary = _copy_summary(work, tmp_path)
    ppl = pd.read_csv(summary / "perplexity.csv", dtype=str, keep_default_na=False)
    row = ppl.index[(ppl.layer_method == "uniform") & (ppl.family == "arithmetic")][0]
    ppl.loc[row, "ppl"] = f"{float(ppl.loc[row, 'ppl']) * factor:.6f}"
    ppl.to_csv(summary / "perplexity.csv", index=False)
    code, out, _ = regress(capsys, REFERENCE, tmp_path)
    assert code == 1
    assert "layer_method=uniform" in out and "family=arithmetic" in out and "1 regressed" in out


def test_plan_not_applied_is_caught(work, tmp_path, capsys):
    """What a plan that is silently not applied produces: the original model's perplexity under the plan's name, and
    the original's expert loads (Spearman 1, no divergence, K experts per token)."""
    summary = _copy_summary(work, tmp_path)
    ppl = pd.read_csv(summary / "perplexity.csv", dtype=str, keep_default_na=False)
    original = ppl[ppl.layer_method == "original"].set_index("family").ppl
    plan = (ppl.layer_method == "alloc-l") & (ppl.token_allocation == "alloc-t") & (ppl.budget.astype(float) == 5)
    ppl.loc[plan, "ppl"] = ppl.loc[plan, "family"].map(original)
    ppl.to_csv(summary / "perplexity.csv", index=False)
    lb = pd.read_csv(summary / "load_balance.csv", dtype=str, keep_default_na=False)
    rows = lb.plan.str.startswith("alloc-l__alloc-t__") & (lb.budget.astype(float) == 5)
    identity = {"spearman": "1.000000", "js_divergence": "0.000000", "js_divergence_weighted": "0.000000",
                "entropy_delta": "0.000000", "experts_per_token": "2.000000"}
    for metric, value in identity.items():
        lb.loc[rows & (lb.metric == metric), "value"] = value
    lb.to_csv(summary / "load_balance.csv", index=False)
    code, out, _ = regress(capsys, REFERENCE, tmp_path, "--out", tmp_path / "report.csv")
    assert code == 1
    report = pd.read_csv(tmp_path / "report.csv")
    moved = report[report.status == "regressed"]
    assert set(moved.table) == {"perplexity.csv", "load_balance.csv"}
    assert moved.key.str.contains(r"alloc-l(?:, token_allocation=|__)alloc-t").all()
    assert moved.key.str.contains(r"budget=5\b|__B5,").all()
    assert "plan=alloc-l__alloc-t__kb0__balanced__B5" in out


def test_every_plan_is_told_apart_from_the_original_in_the_reference():
    """The CI tolerance is tight enough for this reference: each plan's perplexity differs from the original model's
    by more than it in some family, so no plan can silently fall back to the original."""
    tol = load_tolerances(TOLERANCE)["perplexity.csv"].metrics["ppl"].tolerance
    ppl = pd.read_csv(REFERENCE / "summary/perplexity.csv")
    original = ppl[ppl.layer_method == "original"].set_index("family").ppl
    plans = ppl[ppl.layer_method != "original"].assign(change=lambda d: (d.ppl / d.family.map(original) - 1).abs())
    closest = plans.groupby(["layer_method", "token_allocation", "budget"]).change.max()
    assert (closest > 2 * tol).all(), closest


def test_config_change_reruns_the_manifest_and_exits_2(work, tmp_path, capsys):
    """A config key no summary table depends on: only the manifest job re-runs, and its config hash no longer
    matches the reference's."""
    copy = tmp_path / "w"
    shutil.copytree(work, copy, symlinks=True)
    with open(copy / "config/config.yaml", "a") as f:
        f.write("load_balance: {figure_layer: 1}\n")
    res = _snakemake(copy)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _jobs(res) == {"manifest"}
    code, _, err = regress(capsys, REFERENCE, copy / "results")
    assert code == 2 and "config hashes differ" in err and "--allow-config-change" in err
    assert len(err.strip().splitlines()) == 1
    code, out, _ = regress(capsys, REFERENCE, copy / "results", "--allow-config-change")
    assert code == 0 and "compared anyway" in out


def test_editing_a_summary_table_reruns_the_manifest(work, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(work, copy, symlinks=True)
    table = copy / "results/summary/latency.csv"
    table.write_text(table.read_text() + "\n")
    res = _snakemake(copy)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _jobs(res) == {"manifest"}
    manifest = json.loads((copy / TARGET).read_text())
    assert manifest["files"]["latency.csv"] == hashlib.sha256(table.read_bytes()).hexdigest()
