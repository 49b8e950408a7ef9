"""The Snakemake workflow end to end on a tiny config (the same Snakefile the README runs)."""

import re
import shutil

import pandas as pd
import pytest
from helpers import ROOT, TINY, snakemake

from alloc_moe.data.tasks import suite

SUITE_GROUPS = {t.group for t in suite("embedded")}  # the current embedded suite's groups (v3: NLU, Reasoning, Math)


@pytest.fixture
def run(tiny_run):
    """The session's shared tiny run (conftest.tiny_run): read it, dry-run it, copy it; never change it."""
    return tiny_run


def test_workflow_writes_accuracy_perplexity_tables_and_figures(run):
    from alloc_moe.data.tasks.embedded import ITEMS
    from alloc_moe.stages.accuracy import ROW_COLUMNS

    acc = pd.read_csv(run / "results/summary/accuracy.csv", dtype={"k_base": "string"}, keep_default_na=False)
    assert list(acc.columns) == ROW_COLUMNS
    methods = set(zip(acc.layer_method, acc.token_allocation, acc.k_base, acc.calibration))
    assert methods == {
        ("original", "topk", "", ""),
        ("uniform", "topk", "", "none"), ("lexi", "topk", "", "none"), ("uniform", "top-p", "", "balanced"),
        ("alloc-l", "alloc-t", "1", "balanced"),
        ("alloc-l", "topk", "", "balanced"), ("alloc-l", "topk", "", "language"),  # Table 3: calibration sets
        ("uniform", "alloc-t", "0", "none"), ("uniform", "alloc-t", "1", "none"),  # Table 2: K_base 0, 1
    }  # K_base 2 needs B >= 2 x 3 MoE layers: n/a at B = 4 and 5 (the table says so)
    assert "| 2 | n/a | n/a |" in (run / "results/summary/tables/table2_tiny.md").read_text()
    assert len(acc[acc.layer_method == "original"]) == len(ITEMS)
    assert (acc.model == "tiny").all() and (acc.seed == 0).all() and set(acc.group) == SUITE_GROUPS
    ppl = pd.read_csv(run / "results/summary/perplexity.csv", dtype={"k_base": "string"}, keep_default_na=False)
    overall = ppl[ppl.family == "all"]
    plans = overall[overall.layer_method != "original"]
    # the realised budget is the planned one for top-k: computed pairs per token summed over the 3 MoE layers
    topk = plans[plans.token_allocation == "topk"]
    assert (topk.activations_per_token <= topk.budget + 1e-9).all()
    assert overall[overall.layer_method == "original"].activations_per_token.iloc[0] == 6  # 3 layers x top-2
    assert set(ppl.family) == {"all", "language", "patterns", "arithmetic"}
    for fig in ("fig3", "fig4", "fig6"):
        assert (run / f"results/summary/figures/{fig}_tiny.png").stat().st_size > 10_000
    for t in ("table2", "table3", "table4"):
        text = (run / f"results/summary/tables/{t}_tiny.md").read_text()
        assert "B=4" in text and "B=5" in text
    assert "| balanced |" in (run / "results/summary/tables/table3_tiny.md").read_text()
    assert (run / "results/tiny-s0/logs/profile_ppl_balanced.log").exists()
    assert (run / "results/tiny-s0/model/alloc_moe_train.json").exists()


def test_workflow_writes_latency_and_load_balance(run):
    lat = pd.read_csv(run / "results/summary/latency.csv")
    assert {"original", "uniform+topk", "lexi+topk", "alloc-l+alloc-t", "ascending+topk"} == set(lat.method)
    assert set(lat.phase) == {"prefill", "decode"} and sorted(lat[lat.method != "original"].budget.unique()) == [4, 5]
    assert {"speedup_lo", "speedup_hi", "speedup_level", "resolved"} <= set(lat.columns)
    assert (lat.speedup_lo <= lat.speedup).all() and (lat.speedup <= lat.speedup_hi).all()
    lb = pd.read_csv(run / "results/summary/load_balance.csv")
    assert {"model", "plan", "layer", "metric", "value"} <= set(lb.columns) and (lb.model == "tiny").all()
    assert {"spearman", "js_divergence"} <= set(lb.metric)
    for f in ("speedup_vs_budget", "expert_load", "load_balance_by_layer", "plan_allocation", "experts_vs_entropy"):
        assert (run / f"results/tiny-s0/figures/{f}.png").stat().st_size > 5_000, f


def test_workflow_writes_claims_table_consistent_with_accuracy(run):
    from alloc_moe.report.claims import CLAIMS, COLUMNS, verdict
    from alloc_moe.report.summary import group_table

    claims = pd.read_csv(run / "results/summary/claims.csv", keep_default_na=False, na_values={
        c: [""] for c in ("budget", "effect", "ci_low", "ci_high", "se_paired", "se_unpaired")})
    assert list(claims.columns) == COLUMNS and [c.id for c in CLAIMS] == list(dict.fromkeys(claims.claim))
    acc = pd.read_csv(run / "results/summary/accuracy.csv", dtype={"k_base": "string"}, keep_default_na=False)
    g = group_table(acc, k_base=1, calibration="balanced").set_index(["method", "budget", "group"]).value
    fig3 = claims[(claims.claim == "fig3-alloc-moe-vs-baselines") & (claims.comparison == "Alloc-MoE vs Uniform")]
    assert sorted(set(fig3.budget)) == [4, 5] and set(fig3.group) == SUITE_GROUPS | {"mean"}
    for r in fig3.itertuples():  # per-item effects agree with the task scores; every row has a paired interval
        groups = sorted(SUITE_GROUPS) if r.group == "mean" else [r.group]
        expected = sum(g["Alloc-MoE", r.budget, x] - g["Uniform", r.budget, x] for x in groups) / len(groups)
        assert r.effect == pytest.approx(expected, abs=1e-4)
        assert r.ci_low <= r.effect + 1e-9 and r.effect - 1e-9 <= r.ci_high and r.se_paired <= r.se_unpaired + 1e-9
        clustered = " (emb_world_forms: over the facts asked)" if r.group in ("NLU", "mean") else ""  # its 96 facts
        assert r.test == "paired bootstrap over items" + clustered and r.seeds == 1 and r.n_items > 0
    for r in claims.itertuples():  # the verdict follows from the row by the stated rule
        c = next(c for c in CLAIMS if c.id == r.claim)
        if not r.verdict.startswith("unresolved ("):
            ci = (r.ci_low, r.ci_high) if r.ci_low == r.ci_low else None
            assert r.verdict == verdict(c.low, c.high, r.effect, ci), r
    # Dynamic-MoE (top-p) is evaluated, NAEE is not; Ascending is timed, never evaluated
    assert (claims[claims.comparison == "Alloc-MoE vs NAEE"].verdict == "unresolved (no data)").all()
    assert claims[claims.claim == "fig5-speedup-as-lexi"].group.tolist() == ["decode", "prefill"] * 2
    fidelity = (run / "results/summary/fidelity.md").read_text()
    assert fidelity.startswith("## The paper's claims on this run") and "## Scores over training seeds" in fidelity
    assert "## Resolution per task group" in fidelity and "| mean | " in fidelity


def test_workflow_is_up_to_date_after_a_run(run):
    res = snakemake(run, "--cores", "1", "--dry-run", "--quiet")
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.workflow
def test_workflow_outputs_are_deterministic(run, tmp_path):
    """Same config + seed -> byte-identical results, every stage rerun in another process (so another hash seed):
    1. in a fresh directory, training, calibration, profiling (both sensitivities, LExI, routing scores), every plan
       of the lower budget and their evaluation (accuracy items and perplexity per plan), compared file by file with
       the shared run; the upper budget's plans and evaluations are the same code on other inputs and are left out
       (this test reran the whole run until the test-time work of issue 15);
    2. in a copy of the shared run, the summary step alone, forced: accuracy.csv and perplexity.csv byte for byte."""
    fresh = tmp_path / "fresh"
    shutil.copytree(run / "config", fresh / "config")
    r = "results/tiny-s0"
    res = snakemake(fresh, f"{r}/eval/B4", f"{r}/sensitivity/ppl_balanced.csv", f"{r}/sensitivity/ppl_language.csv",
                    f"{r}/sensitivity/lexi.csv", "--cores", "2", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    compared = [f"{r}/model/model.safetensors", *(f"{r}/sensitivity/{n}" for n in
                                                   ("ppl_balanced.csv", "ppl_language.csv", "lexi.csv"))]
    compared += [p.relative_to(fresh).as_posix() for d in ("plans", "eval/B4") for p in
                 sorted((fresh / r / d).glob("*")) if p.is_file() and not p.name.startswith(".")]
    assert len([c for c in compared if "/eval/B4/" in c]) == 8  # every method at B = 4
    assert not (fresh / r / "eval/B5").exists() and not (fresh / "results/summary").exists()
    for rel in compared:
        assert (fresh / rel).read_bytes() == (run / rel).read_bytes(), rel
    # the routing scores by content: torch.save's file holds a random serialization id (plans record the content hash)
    from alloc_moe.backends.hf.stats import load_routing_scores, routing_scores_sha256

    pt = f"{r}/routing/balanced.pt"
    assert routing_scores_sha256(load_routing_scores(fresh / pt)) == routing_scores_sha256(load_routing_scores(run / pt))

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)  # copy2: mtimes kept, so nothing else is outdated
    for rel in ("results/summary/accuracy.csv", "results/summary/perplexity.csv"):
        (copy / rel).unlink()
    res = snakemake(copy, "results/summary/accuracy.csv", "--cores", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    stats = (res.stdout + res.stderr).split("Job stats:", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^(\w+)\s+\d+$", stats, re.MULTILINE) == ["summarize", "total"], stats  # the summary alone
    for rel in ("results/summary/accuracy.csv", "results/summary/perplexity.csv"):
        assert (copy / rel).read_bytes() == (run / rel).read_bytes(), rel


def test_invalid_config_is_rejected_before_any_job(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(TINY.replace("token: topk}", "token: bogus}", 1))
    res = snakemake(tmp_path, "--cores", "1", "--dry-run")
    assert res.returncode != 0
    assert "bogus" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


def test_results_record_versions_commit_and_hardware(run):
    import json

    env = json.loads((run / "results/summary/environment.json").read_text())
    assert {"alloc_moe", "git_commit", "torch", "transformers", "platform", "cpu"} <= set(env)
    run_json = json.loads((run / "results/tiny-s0/eval/original/original.json").read_text())
    assert run_json["environment"]["torch"] == env["torch"]


def _rerun_after_editing(run, tmp_path, module: str) -> dict[str, int]:
    """Copy the repo's workflow and package, append a comment to one module, and dry-run that copy on the finished
    run: the jobs Snakemake would re-run, by rule."""
    import re

    src = tmp_path / "repo"
    shutil.copytree(ROOT / "workflow", src / "workflow")
    shutil.copytree(ROOT / "alloc_moe", src / "alloc_moe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", src / "Snakefile")
    f = src / "alloc_moe" / module
    f.write_text(f.read_text() + "\n# an edit\n")
    res = snakemake(run, "-n", "--cores", "1", snakefile=src / "Snakefile", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1].split("Reasons:", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def test_editing_plotting_code_reruns_only_figures(run, tmp_path):
    jobs = _rerun_after_editing(run, tmp_path, "report/plots.py")
    assert set(jobs) == {"figure", "figure_perplexity", "figure_tradeoff", "plot_latency", "plot_load_balance",
                         "all"}, jobs


def test_editing_the_hf_backend_reruns_evaluation_not_training(run, tmp_path):
    jobs = _rerun_after_editing(run, tmp_path, "backends/hf/apply.py")
    assert "train" not in jobs and "calibration_set" not in jobs and "profile_lexi" not in jobs, jobs
    assert "accuracy" in jobs and "routing_scores" in jobs, jobs


@pytest.mark.parametrize("module", ["harness/regress.py", "cli.py"])  # unused by rules; the dispatcher of every command
def test_editing_unused_code_or_the_dispatcher_reruns_nothing(run, tmp_path, module):
    assert _rerun_after_editing(run, tmp_path, module) == {}


def test_accuracy_jobs_start_longest_first(tmp_path):
    """An accuracy job's priority is its plan count (its time is about that), so of the jobs that are ready together
    the scheduler starts the longest; the plan jobs' priority is above all of them, so every plan is done first and
    the accuracy jobs are ready together. The embedded default's dry run, per job, against the plans in its input."""
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config/config.yaml", tmp_path / "config/config.yaml")
    res = snakemake(tmp_path, "-n", "--cores", "2", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = [block for block in re.split(r"\n(?=(?:local)?rule )", res.stdout + res.stderr)
            if re.match(r"(?:local)?rule accuracy:", block)]
    got = {re.search(r"label=(\S+)", b).group(1): (int(re.search(r"priority: (\d+)", b).group(1)),
                                                   re.search(r"input: (.*)", b).group(1).count("/plans/"))
           for b in jobs}
    assert set(got) == {"original", "B12", "B16", "B20", "B24"}
    assert got["original"] == (1, 0)  # the original model is one evaluation, with no plan file
    assert all(priority == plans > 1 for label, (priority, plans) in got.items() if label != "original"), got
    assert len({p for p, _ in got.values()}) > 2  # the budgets' plan counts differ (12-14): the order is not a tie
    plans = [block for block in re.split(r"\n(?=(?:local)?rule )", res.stdout + res.stderr)
             if re.match(r"(?:local)?rule plan:", block)]
    assert len(plans) > 40 and {re.search(r"priority: (\d+)", b).group(1) for b in plans} == {"100"}
    assert 100 > max(p for p, _ in got.values())  # every plan before any accuracy job: those are ready together
