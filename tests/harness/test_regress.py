"""`alloc-moe regress` on hand-built summary tables: exit codes 0 / 1 / 2, tolerances, units, manifests."""

import json
import math

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from alloc_moe.cli import main
from alloc_moe.harness.manifest import config_hash, write_manifest
from alloc_moe.harness.regress import classify, regress

CONFIG = {"models": {"embedded": {"budgets": [32, 40]}}, "threads": 2}

ACC_HEADER = "model,layer_method,token_allocation,k_base,budget,calibration,backend,task,group,metric,seed,value,stderr"
ACC_ROWS = [
    "embedded,alloc-l,alloc-t,1,32,synthetic,hf,arc_easy,,acc,0,0.600000,0.010000",
    "embedded,uniform,topk,1,32,synthetic,hf,arc_easy,,acc,0,0.550000,0.010000",
    "embedded,uniform,topk,1,32,synthetic,hf,wikitext,,word_perplexity,0,40.0,",
]
# the headers of the workflow's results/summary/*.csv
PPL_HEADER = ("model,method,layer_method,token_allocation,k_base,budget,calibration,seed,family,ppl,n_tokens,"
              "activations_per_token,ppl_change_pct")
PPL_ROWS = ["embedded,Original,original,topk,,64.0,,0,all,100.0,775,64.0,0.0",
            "embedded,Alloc-L,alloc-l,topk,,32.0,balanced,0,all,104.0,775,32.0,4.0"]
LAT_HEADER = "model,plan,method,layer_method,token_allocation,budget,phase,median_ms,speedup,ideal_speedup,seed"
LAT_ROWS = ["embedded,alloc-l__topk__kb1__balanced__B32,alloc-l+topk,alloc-l,topk,32.0,decode,11.0,1.2,1.5,0"]
LB_HEADER = "model,plan,layer_method,token_allocation,budget,layer,metric,value,seed"
LB_ROWS = ["embedded,alloc-l__topk__kb1__balanced__B32,alloc-l,topk,32.0,1,spearman,0.900,0",
           "embedded,alloc-l__topk__kb1__balanced__B32,alloc-l,topk,32.0,1,js_divergence,0.020,0"]


def make_run(root, name, acc=ACC_ROWS, ppl=PPL_ROWS, lat=LAT_ROWS, lb=LB_ROWS, config=CONFIG, manifest=True):
    """A run directory with summary/{accuracy,perplexity,latency,load_balance}.csv and a manifest."""
    run = root / name
    summary = run / "summary"
    summary.mkdir(parents=True)
    for fname, header, rows in [("accuracy.csv", ACC_HEADER, acc), ("perplexity.csv", PPL_HEADER, ppl),
                                ("latency.csv", LAT_HEADER, lat), ("load_balance.csv", LB_HEADER, lb)]:
        if rows is not None:
            (summary / fname).write_text("\n".join([header, *rows]) + "\n")
    if manifest:
        write_manifest(run, config)
    return run


def cli(capsys, *args):
    code = main(["regress", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def base(tmp_path):
    return make_run(tmp_path, "base")


def test_equal_runs_exit_0(tmp_path, base, capsys):
    cur = make_run(tmp_path, "cur")
    code, out, err = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 0, err
    assert "0 regressed, 0 missing, 0 improved, 0 new, 8 ok" in out
    assert err == ""


def test_claims_table_is_not_compared(tmp_path, base, capsys):
    """claims.csv (verdicts derived from the compared values) is not a TABLES entry: in one run or both, ignored."""
    cur = make_run(tmp_path, "cur")
    (cur / "summary/claims.csv").write_text("claim,verdict\nfig3,does not hold\n")
    (base / "summary/claims.csv").write_text("claim,verdict\nfig3,holds\n")
    code, out, err = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 0 and "8 ok" in out and "claims" not in out + err


def test_run_dir_or_summary_dir_are_both_accepted(tmp_path, base, capsys):
    cur = make_run(tmp_path, "cur")
    assert cli(capsys, "--baseline", base / "summary", "--current", cur)[0] == 0


def test_planted_accuracy_drop_is_caught_and_named(tmp_path, base, capsys):
    acc = [ACC_ROWS[0].replace("0.600000", "0.550000"), *ACC_ROWS[1:]]  # -5 points, noise threshold 2*sqrt(2) points
    cur = make_run(tmp_path, "cur", acc=acc)
    code, out, _ = cli(capsys, "--baseline", base, "--current", cur, "--out", tmp_path / "report.csv")
    assert code == 1
    assert "layer_method=alloc-l" in out and "regressed" in out
    report = pd.read_csv(tmp_path / "report.csv")
    row = report[report.status == "regressed"].iloc[0]
    assert row.table == "accuracy.csv" and "task=arc_easy" in row.key
    assert row.change == pytest.approx(-5.0)
    assert row.threshold == pytest.approx(2 * math.sqrt(2))  # max(1 point, 2 x hypot(1, 1) points)
    assert (report.status == "regressed").sum() == 1


def test_accuracy_drop_within_twice_the_stderr_passes(tmp_path, base):
    acc = [ACC_ROWS[0].replace("0.600000", "0.575000"), *ACC_ROWS[1:]]  # -2.5 points < 2.83
    report, _ = regress(base, make_run(tmp_path, "cur", acc=acc))
    assert set(report.status) == {"ok"}


def test_accuracy_in_percent_is_compared_in_points(tmp_path):
    pct = [r.replace("0.600000", "60.0").replace("0.550000", "55.0").replace("0.010000", "1.0") for r in ACC_ROWS]
    base = make_run(tmp_path, "base", acc=pct)
    dropped = [pct[0].replace(",60.0,", ",57.0,"), *pct[1:]]  # -3 points > 2.83
    report, _ = regress(base, make_run(tmp_path, "cur", acc=dropped))
    row = report[report.status == "regressed"].iloc[0]
    assert row.change == pytest.approx(-3.0) and row.threshold == pytest.approx(2 * math.sqrt(2))


def test_accuracy_improvement_exits_0_and_is_reported(tmp_path, base, capsys):
    acc = [ACC_ROWS[0].replace("0.600000", "0.700000"), *ACC_ROWS[1:]]
    code, out, _ = cli(capsys, "--baseline", base, "--current", make_run(tmp_path, "cur", acc=acc))
    assert code == 0
    assert "improved" in out and "1 improved" in out


def test_perplexity_like_accuracy_metric_is_relative_and_lower_is_better(tmp_path, base):
    worse = [*ACC_ROWS[:2], ACC_ROWS[2].replace(",40.0,", ",40.8,")]  # +2% word perplexity
    report, _ = regress(base, make_run(tmp_path, "cur", acc=worse))
    row = report[report.status != "ok"].iloc[0]
    assert row.status == "regressed" and row.unit == "rel" and row.change == pytest.approx(0.02)


def _latency(ms: float) -> list[str]:
    return [LAT_ROWS[0].replace(",11.0,", f",{ms},")]


def test_planted_latency_slowdown_is_caught(tmp_path, base, capsys):
    code, out, _ = cli(capsys, "--baseline", base, "--current", make_run(tmp_path, "cur", lat=_latency(12.5)))
    assert code == 1
    assert "phase=decode" in out
    report, _ = regress(base, tmp_path / "cur")
    row = report[report.table == "latency.csv"].iloc[0]
    assert (row.column, row.baseline, row.current) == ("median_ms", 11.0, 12.5)
    assert row.change == pytest.approx(12.5 / 11 - 1)


def test_latency_within_tolerance_or_faster_passes(tmp_path, base):
    for name, factor, status in [("slightly", 1.09, "ok"), ("faster", 0.5, "improved")]:
        rows = _latency(11.0 * factor)
        report, _ = regress(base, make_run(tmp_path, name, lat=rows))
        assert report[report.table == "latency.csv"].status.tolist() == [status], name


def test_perplexity_rise_regresses_and_fall_improves(tmp_path, base):
    up = [PPL_ROWS[0], PPL_ROWS[1].replace(",104.0,", ",105.2,")]  # +1.15% > 1%
    down = [PPL_ROWS[0], PPL_ROWS[1].replace(",104.0,", ",100.0,")]
    assert regress(base, make_run(tmp_path, "up", ppl=up))[0].status.tolist().count("regressed") == 1
    assert regress(base, make_run(tmp_path, "down", ppl=down))[0].status.tolist().count("improved") == 1


def test_budget_written_differently_is_the_same_key(tmp_path, base):
    ppl = [r.replace(",32.0,", ",32,") for r in PPL_ROWS]
    assert set(regress(base, make_run(tmp_path, "cur", ppl=ppl))[0].status) == {"ok"}


def test_load_balance_moves_either_way_regress(tmp_path, base):
    lb = [LB_ROWS[0].replace("0.900", "0.990"), LB_ROWS[1]]
    report, _ = regress(base, make_run(tmp_path, "cur", lb=lb))
    assert report[report.table == "load_balance.csv"].status.tolist() == ["ok", "regressed"]  # sorted: js, spearman


def test_runs_of_several_seeds_are_kept_apart(tmp_path):
    """A multi-seed config (the fidelity study) repeats every row per seed: seed is a key column of every table."""
    ppl = [*PPL_ROWS, *(r.replace(",0,all,", ",1,all,") for r in PPL_ROWS)]
    lat, lb = ([*rows, *(r[:-2] + ",1" for r in rows)] for rows in (LAT_ROWS, LB_ROWS))
    base = make_run(tmp_path, "base", ppl=ppl, lat=lat, lb=lb)
    worse = [*ppl[:3], ppl[3].replace(",104.0,", ",110.0,")]  # Alloc-L, seed 1 only
    report, _ = regress(base, make_run(tmp_path, "cur", ppl=worse, lat=lat, lb=lb))
    moved = report[report.status != "ok"]
    assert moved.status.tolist() == ["regressed"] and "seed=1" in moved.key.iloc[0]


def test_missing_row_regresses_new_row_is_info(tmp_path, base, capsys):
    code, out, _ = cli(capsys, "--baseline", base, "--current", make_run(tmp_path, "less", ppl=PPL_ROWS[:1]))
    assert code == 1 and "missing" in out and "layer_method=alloc-l" in out
    more = [*PPL_ROWS, "embedded,Uniform,uniform,topk,,32.0,none,0,all,106.0,775,32.0,6.0"]
    code, out, _ = cli(capsys, "--baseline", base, "--current", make_run(tmp_path, "more", ppl=more))
    assert code == 0 and "1 new" in out


@pytest.mark.parametrize("case, message", [
    ("missing column", "lacks column(s) stderr"),
    ("duplicate key", "duplicate key"),
    ("missing file", "lacks latency.csv"),
    ("non-numeric", "non-numeric value 'fast'"),
    ("missing dir", "is not a directory"),
])
def test_unusable_input_exits_2_with_one_line(tmp_path, base, capsys, case, message):
    cur = tmp_path / "cur"
    if case == "missing column":
        make_run(tmp_path, "cur", acc=[r.rsplit(",", 1)[0] for r in ACC_ROWS])
        (cur / "summary/accuracy.csv").write_text("\n".join([ACC_HEADER.rsplit(",", 1)[0], *(
            r.rsplit(",", 1)[0] for r in ACC_ROWS)]) + "\n")
    elif case == "duplicate key":
        make_run(tmp_path, "cur", ppl=[*PPL_ROWS, PPL_ROWS[1]])
    elif case == "missing file":
        make_run(tmp_path, "cur", lat=None)
    elif case == "non-numeric":
        make_run(tmp_path, "cur", lat=[LAT_ROWS[0].replace(",11.0,", ",fast,")])
    code, _, err = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_config_hash_mismatch_exits_2_unless_allowed(tmp_path, base, capsys):
    cur = make_run(tmp_path, "cur", config={**CONFIG, "threads": 1})
    code, _, err = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 2 and "config hashes differ" in err and "--allow-config-change" in err
    code, out, _ = cli(capsys, "--baseline", base, "--current", cur, "--allow-config-change")
    assert code == 0 and "compared anyway" in out


def test_missing_manifest_exits_2_unless_allowed(tmp_path, base, capsys):
    cur = make_run(tmp_path, "cur", manifest=False)
    code, _, err = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 2 and "no manifest" in err
    assert cli(capsys, "--baseline", base, "--current", cur, "--allow-config-change")[0] == 0


def test_tolerance_file_loosens_and_tightens(tmp_path, base):
    acc = [ACC_ROWS[0].replace("0.600000", "0.550000"), *ACC_ROWS[1:]]
    cur = make_run(tmp_path, "cur", acc=acc)
    loose = tmp_path / "loose.yaml"
    loose.write_text("accuracy:\n  value: {tolerance: 6, stderr_factor: 0}\n")
    assert set(regress(base, cur, loose)[0].status) == {"ok"}
    tight = tmp_path / "tight.yaml"
    tight.write_text("latency.csv:\n  median_ms: {tolerance: 0.0}\naccuracy.csv:\n  value:\n    by_metric:\n"
                     "      word_perplexity: {tolerance: 0.0}\n")
    same = make_run(tmp_path, "same")
    assert set(regress(base, same, tight)[0].status) == {"ok"}  # equal values stay ok at zero tolerance


@pytest.mark.parametrize("text, message", [
    ("accuracy.csv:\n  value: {tolernce: 2}\n", "unknown field(s) tolernce"),
    ("speed.csv: {}\n", "unknown table 'speed.csv'"),
    ("latency.csv:\n  median_ms: {direction: up}\n", "direction 'up'"),
    ("latency.csv:\n  median_ms: {tolerance: -1}\n", "tolerance must be a number >= 0"),
    ("latency.csv:\n  median_ms: {tolerance: .nan}\n", "tolerance must be a number >= 0 (.inf"),
    ("latency.csv:\n  median_ms: {stderr_factor: .inf}\n", "stderr_factor must be a finite number >= 0"),
    ("perplexity.csv:\n  ppl: {by_metric: {x: {tolerance: 1}}}\n", "by_metric is not allowed"),
    ("[unclosed\n", "not readable YAML"),
])
def test_bad_tolerance_file_exits_2(tmp_path, base, capsys, text, message):
    tol = tmp_path / "tol.yaml"
    tol.write_text(text)
    code, _, err = cli(capsys, "--baseline", base, "--current", make_run(tmp_path, "cur"), "--tolerance", tol)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_report_csv_holds_every_compared_value(tmp_path, base, capsys):
    out = tmp_path / "r" / "report.csv"
    cli(capsys, "--baseline", base, "--current", make_run(tmp_path, "cur"), "--out", out)
    report = pd.read_csv(out)
    assert len(report) == 8 and set(report.status) == {"ok"}
    assert list(report.columns)[:3] == ["table", "key", "column"]


def test_config_hash_ignores_key_order_but_not_values():
    a = {"x": 1, "y": {"b": [1, 2], "a": "s"}}
    b = json.loads(json.dumps({"y": {"a": "s", "b": [1, 2]}, "x": 1}))
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "x": 2})
    assert len(config_hash(a)) == 64


def test_manifest_records_hash_commit_versions_hardware(tmp_path):
    path = write_manifest(tmp_path, CONFIG)
    manifest = json.loads(path.read_text())
    assert path == tmp_path / "summary/manifest.json"
    assert manifest["config_hash"] == config_hash(CONFIG) and manifest["config"] == CONFIG
    assert {"git_commit", "torch", "transformers", "python", "platform", "cpu"} <= set(manifest)
    assert manifest["packages"]["pandas"] == pd.__version__ and manifest["hardware"]["cpu_count"] >= 1
    assert manifest["files"] == {}


def test_manifest_hashes_its_tables_and_regress_notes_an_edited_one(tmp_path, capsys):
    import hashlib

    base = make_run(tmp_path, "base", manifest=False)
    tables = sorted((base / "summary").glob("*.csv"))
    manifest = json.loads(write_manifest(base, CONFIG, files=tables).read_text())
    assert manifest["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tables}
    cur = make_run(tmp_path, "cur")
    code, out, _ = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 0 and "no longer match" not in out
    edited = base / "summary/perplexity.csv"
    edited.write_text(edited.read_text().replace(",104.0,", ",103.9,"))
    code, out, _ = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 0 and "baseline: perplexity.csv no longer match(es) the sha256" in out


def test_regress_notes_runs_made_on_different_cpus(tmp_path, capsys):
    """A model trained on another CPU type can differ like another seed (docs/guides/reproducibility.md): the report
    says so when the manifests' CPU models differ, and only then."""
    base, cur = make_run(tmp_path, "base"), make_run(tmp_path, "cur")
    code, out, _ = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 0 and "CPUs differ" not in out
    for run, cpu in ((base, "AMD EPYC"), (cur, "Intel(R) Xeon(R) Processor")):
        m = json.loads((run / "summary/manifest.json").read_text())
        m["hardware"]["cpu_model"] = cpu
        (run / "summary/manifest.json").write_text(json.dumps(m))
    code, out, _ = cli(capsys, "--baseline", base, "--current", cur)
    assert code == 0 and "CPUs differ (baseline AMD EPYC, current Intel(R) Xeon(R) Processor)" in out


def test_infinite_tolerance_reports_but_never_regresses(tmp_path, base):
    tol = tmp_path / "tol.yaml"
    tol.write_text("latency.csv:\n  median_ms: {tolerance: .inf}\n")
    report, _ = regress(base, make_run(tmp_path, "slow", lat=_latency(110.0)), tol)
    row = report[report.table == "latency.csv"].iloc[0]
    assert row.status == "ok" and row.change == pytest.approx(9.0)
    fewer = make_run(tmp_path, "fewer", lat=[r.replace("decode", "prefill") for r in LAT_ROWS])
    assert "missing" in regress(base, fewer, tol)[0].status.tolist()  # a row that disappears still fails


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(delta=finite, threshold=st.floats(min_value=0, max_value=1e3), direction=st.sampled_from(["higher", "lower"]))
def test_classify_is_antisymmetric_in_the_change(delta, threshold, direction):
    flip = {"regressed": "improved", "improved": "regressed", "ok": "ok"}
    assert classify(-delta, threshold, direction) == flip[classify(delta, threshold, direction)]
    other = "lower" if direction == "higher" else "higher"
    assert classify(delta, threshold, other) == flip[classify(delta, threshold, direction)]


@given(delta=finite, threshold=st.floats(min_value=0, max_value=1e3))
def test_classify_regresses_exactly_beyond_the_tolerance(delta, threshold):
    status = classify(delta, threshold, "lower")
    assert (status == "regressed") == (delta > threshold * (1 + 1e-9) + 1e-12)
    assert classify(delta, threshold, "either") in ("ok", "regressed")
