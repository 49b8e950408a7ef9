"""The Snakemake HTML report (every figure and table, captioned) and the paper's Fig. 1 trade-off view."""

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from helpers import ROOT

from alloc_moe.errors import AllocMoeError
from alloc_moe.report import plots
from alloc_moe.report.summary import METHOD_NAMES, tradeoff_table

# ---- the join behind Fig. 1, on a hand-built frame ----------------------------------------------------------------


def _acc(rows):
    """accuracy.csv rows from (layer, token, k_base, calibration, budget, seed, {task: (group, value, stderr)})."""
    out = []
    for layer, token, kb, cal, budget, seed, tasks in rows:
        for task, (group, value, se) in tasks.items():
            out.append({"model": "m", "layer_method": layer, "token_allocation": token, "k_base": kb,
                        "budget": float(budget), "calibration": cal, "backend": "hf", "task": task, "group": group,
                        "metric": "acc", "value": value, "stderr": se, "seed": seed})
    return pd.DataFrame(out).astype({"k_base": "string"})


def _lat(rows):
    """latency.csv rows from (plan, layer, token, budget, seed, prefill speedup, decode speedup)."""
    return pd.DataFrame([{"model": "m", "plan": plan, "method": f"{layer}+{token}", "layer_method": layer,
                          "token_allocation": token, "budget": float(budget), "phase": phase, "median_ms": 1.0,
                          "speedup": s, "ideal_speedup": s + 0.1, "seed": seed}
                         for plan, layer, token, budget, seed, *sp in rows
                         for phase, s in zip(("prefill", "decode"), sp)])


def _tasks(a, b, c):
    return {"t1": ("NLU", a, 0.3), "t2": ("NLU", a + 2, 0.4), "t3": ("Math", b, 0.5), "t4": ("Reasoning", c, 1.2)}


ACC = _acc([
    ("original", "topk", "", "", 6, 0, _tasks(80, 40, 60)),
    ("original", "topk", "", "", 6, 1, _tasks(82, 42, 62)),
    ("uniform", "topk", "", "none", 3, 0, _tasks(70, 30, 50)),
    ("uniform", "topk", "", "none", 3, 1, _tasks(72, 32, 52)),
    ("uniform", "topk", "", "none", 4, 0, _tasks(75, 35, 55)),
    ("alloc-l", "alloc-t", "1", "balanced", 3, 0, _tasks(78, 38, 58)),
    ("alloc-l", "alloc-t", "1", "balanced", 3, 1, _tasks(76, 36, 56)),
    ("alloc-l", "alloc-t", "0", "balanced", 3, 0, _tasks(10, 10, 10)),  # another K_base: not the timed plan
    ("alloc-l", "alloc-t", "1", "language", 3, 0, _tasks(10, 10, 10)),  # another calibration set: neither
    ("uniform", "alloc-t", "1", "none", 3, 0, _tasks(77, 37, 57)),  # evaluated, never timed
])
LAT = _lat([
    ("original", "original", "topk", 6, 0, 1.0, 1.0), ("original", "original", "topk", 6, 1, 1.0, 1.0),
    ("uniform__topk__kb1__none__B3", "uniform", "topk", 3, 0, 1.2, 1.5),
    ("uniform__topk__kb1__none__B3", "uniform", "topk", 3, 1, 1.4, 1.7),
    ("uniform__topk__kb1__none__B4", "uniform", "topk", 4, 0, 1.1, 1.2),
    ("alloc-l__alloc-t__kb1__balanced__B3", "alloc-l", "alloc-t", 3, 0, 1.15, 1.45),
    ("lexi__topk__kb1__none__B3", "lexi", "topk", 3, 0, 1.3, 1.6),  # timed, never evaluated
])


def _score(a, b, c):
    """mean of the group scores (NLU = mean of its 2 tasks) of `_tasks(a, b, c)`, and its SE."""
    se_nlu = (0.3 ** 2 + 0.4 ** 2) ** 0.5 / 2
    return ((a + 1) + b + c) / 3, (se_nlu ** 2 + 0.5 ** 2 + 1.2 ** 2) ** 0.5 / 3


def test_tradeoff_joins_methods_with_both_measurements():
    t = tradeoff_table(ACC, LAT, k_base=1, calibration="balanced")
    assert list(t.columns) == ["model", "method", "budget", "phase", "value", "stderr", "speedup", "speedup_lo",
                               "speedup_hi", "resolved", "seeds"]
    assert t["speedup_lo"].isna().all() and t["resolved"].isna().all()  # a latency table without intervals
    assert not t.duplicated(["model", "method", "budget", "phase"]).any()
    assert set(zip(t.method, t.budget)) == {("Original", 6.0), ("Uniform", 3.0), ("Uniform", 4.0), ("Alloc-MoE", 3.0)}
    row = t.set_index(["method", "budget", "phase"])
    # the original model sits at speedup 1 with its score, averaged over both seeds
    (s0, e0), (s1, e1) = _score(80, 40, 60), _score(82, 42, 62)
    assert row.loc[("Original", 6.0, "decode"), "speedup"] == 1.0
    assert row.loc[("Original", 6.0, "decode"), "value"] == pytest.approx((s0 + s1) / 2)
    assert row.loc[("Original", 6.0, "decode"), "stderr"] == pytest.approx((e0 ** 2 + e1 ** 2) ** 0.5 / 2)
    # Uniform at B=3: seeds averaged, speedup per phase
    (s0, _), (s1, _) = _score(70, 30, 50), _score(72, 32, 52)
    assert row.loc[("Uniform", 3.0, "prefill"), "value"] == pytest.approx((s0 + s1) / 2)
    assert row.loc[("Uniform", 3.0, "prefill"), "speedup"] == pytest.approx(1.3)
    assert row.loc[("Uniform", 3.0, "decode"), "speedup"] == pytest.approx(1.6)
    assert row.loc[("Uniform", 3.0, "decode"), "seeds"] == 2
    # Alloc-MoE: only seed 0 was timed, so only seed 0's score counts; the K_base 0 / other-calibration rows do not
    alloc = row.loc[("Alloc-MoE", 3.0, "decode")]
    assert (alloc["value"], alloc["speedup"], alloc["seeds"]) == (pytest.approx(_score(78, 38, 58)[0]), 1.45, 1)


def test_tradeoff_carries_speedup_intervals(tmp_path):
    lat = LAT.assign(speedup_lo=LAT["speedup"] - 0.05, speedup_hi=LAT["speedup"] + 0.05, resolved=True)
    lat.loc[(lat.plan == "uniform__topk__kb1__none__B3") & (lat.seed == 1), "resolved"] = False
    row = tradeoff_table(ACC, lat, k_base=1, calibration="balanced").set_index(["method", "budget", "phase"])
    assert row.loc[("Uniform", 3.0, "decode"), "speedup_lo"] == pytest.approx(1.55)  # mean over the seeds
    assert row.loc[("Uniform", 3.0, "decode"), "resolved"] == False  # noqa: E712 (one seed unresolved)
    assert row.loc[("Uniform", 4.0, "decode"), "resolved"] == True  # noqa: E712
    plots.accuracy_vs_speedup(row.reset_index(), tmp_path / "f1.png")  # x bars, a hollow marker
    assert (tmp_path / "f1.png").stat().st_size > 1000


def test_tradeoff_refuses_a_method_timed_twice_at_one_budget():
    twice = pd.concat([LAT, _lat([("uniform__topk__kb2__none__B3", "uniform", "topk", 3, 0, 1.0, 1.0)])])
    with pytest.raises(AllocMoeError, match=r"times Uniform at B=3 \(prefill, seed 0\) more than once"):
        tradeoff_table(ACC, twice, k_base=1, calibration="balanced")


def test_tradeoff_figure_renders(tmp_path):
    plots.accuracy_vs_speedup(tradeoff_table(ACC, LAT, k_base=1, calibration="balanced"), tmp_path / "f1.png",
                              title="m")
    assert (tmp_path / "f1.png").stat().st_size > 5_000


# ---- every report() item has a caption, every caption is used ---------------------------------------------------


def test_every_report_item_has_an_existing_caption():
    used = set()
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        calls = re.findall(r"\breport\(", text)
        captions = re.findall(r'caption=f?"([^"]+)"', text)
        assert len(captions) == len(calls), f"{smk.name}: every report() needs a caption"
        for cap in captions:
            # f-string captions name one file per PAPER_TABLES / SUMMARY_TABLES entry; resolved below
            if "{" not in cap:
                assert (smk.parent / cap).resolve().is_file(), f"{smk.name}: {cap} does not exist"
                used.add((smk.parent / cap).resolve().name)
    summary = (ROOT / "workflow" / "rules" / "summary.smk").read_text()
    used |= {f"{t}.rst" for t in re.findall(r'"(table\d)": "Table \d"', summary)}
    used |= {f"{c}.rst" for c in re.findall(r'\("[\w.]+", "(\w+)", "[\w ]+", ', summary)}
    assert 'report: "workflow/report/workflow.rst"' in (ROOT / "Snakefile").read_text()
    used.add("workflow.rst")
    present = {p.name for p in (ROOT / "workflow" / "report").glob("*.rst")}
    assert present == used, f"captions missing: {used - present}; unused: {present - used}"


# ---- the report of a real (tiny) run ----------------------------------------------------------------------------


@pytest.fixture
def report(tiny_report):
    """The session's shared tiny run (helpers.TINY) and its `snakemake --report` (conftest.tiny_report): the run
    directory, the report's HTML and its results."""
    return tiny_report


def _caption(result: dict) -> str:
    """A result's caption as plain text, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", result["caption"])).split())


def test_report_holds_every_figure_and_table(report):
    work, _, results = report
    figures = {str(p.relative_to(work)) for p in (work / "results").glob("**/figures/*.png")}
    assert len(figures) == 5 + 5  # fig3, fig4, fig6, perplexity, tradeoff; 5 figures of the one run
    tables = ["accuracy.csv", "perplexity.csv", "latency.csv", "load_balance.csv", "fidelity.md", "claims.csv",
              "environment.json",
              "tables/table2_tiny.md", "tables/table3_tiny.md", "tables/table4_tiny.md"]
    assert all((work / "results/summary" / t).is_file() for t in tables)
    pages = {f"results/summary/report/{Path(t).stem}.html" for t in tables}
    assert set(results) == figures | pages
    for page in pages:
        assert results[page]["mime_type"] == "text/html"  # shown inline in the report, not as a download
        assert "<table" in (work / page).read_text(), page
    assert "Table 2 (tiny)" in (work / "results/summary/report/table2_tiny.html").read_text()


def test_report_captions_name_the_paper_figure_or_table(report):
    _, text, results = report
    assert "System Message" not in text  # every caption is valid reStructuredText
    expected = {"fig3_tiny.png": "Paper Fig. 3", "fig4_tiny.png": "Paper Fig. 4", "fig6_tiny.png": "Paper Fig. 6",
                "tradeoff_tiny.png": "Paper Fig. 1", "speedup_vs_budget.png": "Paper Fig. 5",
                "expert_load.png": "Paper Fig. 7", "load_balance_by_layer.png": "Paper Fig. 8",
                "plan_allocation.png": "Paper Fig. 12a", "experts_vs_entropy.png": "Paper Fig. 12b",
                "table2_tiny.html": "Paper Table 2", "table3_tiny.html": "Paper Table 3",
                "table4_tiny.html": "Paper Table 4", "perplexity_tiny.png": "no paper figure"}
    captions = {r["name"]: _caption(r) for r in results.values()}
    for name, caption in captions.items():
        assert len(caption) > 150, name
        if name in expected:
            assert expected[name] in caption, (name, caption)
    # captions are filled from the config and the job: budgets, the figure plan, the latency protocol
    assert "B = 4, 5" in captions["fig3_tiny.png"] and "K_base = 1" in captions["fig3_tiny.png"]
    assert "alloc-l__alloc-t__kb1__balanced__B4" in captions["expert_load.png"]
    protocol = "batch 2, prompt 8 random tokens, 3 decode steps, 0 warm-up + 2 timed runs"
    assert protocol in captions["speedup_vs_budget.png"]
    assert "Alloc-MoE reproduction" in text and "Accuracy vs speedup" in text  # the workflow description


def test_report_shows_environment_with_config_hash(report):
    from alloc_moe.harness.manifest import config_hash

    work, _, results = report
    page = (work / "results/summary/report/environment.html").read_text()
    env = json.loads((work / "results/summary/environment.json").read_text())
    config = json.loads(html.unescape(re.search(r"<pre>(.*)</pre>", page, re.DOTALL).group(1)))
    assert config["models"]["tiny"]["budgets"] == [4, 5]
    assert f"<td>config_hash</td><td>{config_hash(config)}</td>" in page
    assert f"<td>git_commit</td><td>{env['git_commit']}</td>" in page and env["torch"] in page
    assert results["results/summary/report/environment.html"]["labels"] == {"table": "environment.json"}


def test_tradeoff_figure_of_the_run_has_only_evaluated_and_timed_methods(report):
    work, _, _ = report
    acc = pd.read_csv(work / "results/summary/accuracy.csv", dtype={"k_base": "string"}, keep_default_na=False)
    lat = pd.read_csv(work / "results/summary/latency.csv")
    evaluated = {METHOD_NAMES[m] for m in zip(acc.layer_method, acc.token_allocation)}
    timed = {METHOD_NAMES[m] for m in zip(lat.layer_method, lat.token_allocation)}
    assert {"Alloc-T", "Alloc-L", "Dynamic-MoE"} <= evaluated - timed  # evaluated, not timed
    assert "Ascending" in timed - evaluated  # timed, not evaluated
    t = tradeoff_table(acc, lat, k_base=1, calibration="balanced")
    assert set(t.method) == {"Original", "Uniform", "LExI", "Alloc-MoE"}  # only both
    assert len(t) == (1 + 2 + 2 + 2) * 2  # Original; Uniform, LExI and Alloc-MoE at B = 4, 5; prefill and decode
    assert (t[t.method == "Original"].speedup == 1.0).all()
    assert (work / "results/summary/figures/tradeoff_tiny.png").stat().st_size > 10_000
