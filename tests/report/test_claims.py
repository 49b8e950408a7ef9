"""`alloc_moe.report.claims`: the verdict rule, and claims evaluated on hand-made eval JSONs, latency and
load-balance tables (holds / does not hold / unresolved / no data), byte-stable claims.csv."""

import json
import math

import pandas as pd
import pytest

from alloc_moe.errors import AllocMoeError
from alloc_moe.report.claims import (CLAIMS, COLUMNS, claims_details, claims_summary, claims_table, load_entries,
                                     resolution, resolution_summary, seed_resolution, verdict)
from alloc_moe.report.summary import eval_files, write_csv

N = 100  # items per task
METHODS = {"Uniform": ("uniform", "topk", ""), "Alloc-MoE": ("alloc-l", "alloc-t", 1), "LExI": ("lexi", "topk", ""),
           "Alloc-T": ("uniform", "alloc-t", 1)}
TASKS = {"t_nlu": "NLU", "t_math": "Math"}


def _write(d, method, budget, items, seed=0, per_item=True):
    """An eval JSON of `method` at `budget`: items {task: [0/1] * N}; rows score their mean in points."""
    layer, token, kb = METHODS[method]
    rows = [{"model": "m", "layer_method": layer, "token_allocation": token, "k_base": kb, "budget": float(budget),
             "calibration": "cal" if layer == "alloc-l" else "", "backend": "hf", "task": t, "group": TASKS[t],
             "metric": "acc", "value": 100.0 * sum(v) / len(v), "stderr": 1.0, "seed": seed} for t, v in items.items()]
    res = {"rows": rows, **({"items": {t: {t: v} for t, v in items.items()}} if per_item else {})}
    path = d / f"{layer}__{token}__kb{kb or 1}__B{budget}__s{seed}.json"
    path.write_text(json.dumps(res))
    return path


def _base():
    return [1] * 60 + [0] * 40


def _better(k):  # the base with k more items right
    return [1] * (60 + k) + [0] * (40 - k)


def _row(df, claim, **kw):
    d = df[df.claim == claim]
    for k, v in kw.items():
        d = d[d[k] == v]
    assert len(d) == 1, (claim, kw, d)
    return d.iloc[0]


@pytest.mark.parametrize("low, high, effect, ci, expected", [
    (0, math.inf, 0.5, (0.1, 0.9), "holds"),
    (0, math.inf, 0.0, (0.0, 0.0), "holds"),  # identical answers: A >= B holds exactly
    (0, math.inf, -0.5, (-0.9, -0.1), "does not hold"),
    (0, math.inf, 0.2, (-0.3, 0.7), "unresolved"),
    (-1, 1, 0.2, (-0.5, 0.8), "holds"),
    (-1, 1, 1.5, (1.1, 1.9), "does not hold"),
    (-1, 1, 0.9, (0.5, 1.3), "unresolved"),
    (0.7, 1, 0.8, None, "holds (point)"),
    (0.7, 1, 0.6, None, "does not hold (point)"),
    (0, math.inf, math.nan, None, "unresolved (no data)"),
])
def test_verdict_rule(low, high, effect, ci, expected):
    assert verdict(low, high, effect, ci) == expected


@pytest.fixture
def evals(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    base = {"t_nlu": _base(), "t_math": _base()}
    _write(d, "Uniform", 4, base)
    lexi = _better(20)
    lexi[0:12], lexi[85:93] = [0] * 12, [1] * 8  # Alloc-MoE right on 12 items LExI misses, wrong on 8 it gets
    _write(d, "LExI", 4, {"t_nlu": _base(), "t_math": lexi})
    _write(d, "Alloc-MoE", 4, {"t_nlu": _base(), "t_math": _better(20)})  # 20 more right, none lost
    _write(d, "Alloc-T", 4, {"t_nlu": _base(), "t_math": [0] * 30 + [1] * 30 + [0] * 40})  # 30 fewer right
    return d


def test_accuracy_claims_hold_fail_and_stay_unresolved(evals):
    df = claims_table([evals], k_base=1, calibration="cal")
    assert list(df.columns) == COLUMNS and set(df.claim) == {c.id for c in CLAIMS}
    fig3 = "fig3-alloc-moe-vs-baselines"
    math_u = _row(df, fig3, group="Math", comparison="Alloc-MoE vs Uniform")
    assert math_u.effect == pytest.approx(20.0) and math_u.verdict == "holds" and math_u.ci_low > 0
    assert math_u.n_items == N and math_u.seeds == 1 and math_u.test == "paired bootstrap over items"
    assert math_u.se_paired < math_u.se_unpaired  # the same items: the paired SE is the smaller
    # the mean of the groups: NLU (identical) and Math weigh 1/2 each
    assert _row(df, fig3, group="mean", comparison="Alloc-MoE vs Uniform").effect == pytest.approx(10.0)
    nlu = _row(df, fig3, group="NLU", comparison="Alloc-MoE vs Uniform")
    assert (nlu.effect, nlu.ci_low, nlu.ci_high, nlu.verdict) == (0.0, 0.0, 0.0, "holds")
    # a group the suite does not have (here Reasoning; the embedded suite v2 has no NLU) gets no row at all
    assert set(df[df.claim == fig3].group) - {""} == {"NLU", "Math", "mean"}  # "": a side not evaluated
    # +4 points from 12 items won and 8 lost: within the noise
    lexi = _row(df, fig3, group="Math", comparison="Alloc-MoE vs LExI")
    assert lexi.effect == pytest.approx(4.0) and lexi.ci_low < 0 < lexi.ci_high and lexi.verdict == "unresolved"
    # Alloc-T loses 30 items against Uniform: does not hold; against top-p (never evaluated): no data
    fig6 = "fig6-alloc-t-vs-token-baselines"
    t = _row(df, fig6, group="Math", comparison="Alloc-T vs Uniform")
    assert t.effect == pytest.approx(-30.0) and t.verdict == "does not hold" and t.ci_high < 0
    dyn = _row(df, fig6, comparison="Alloc-T vs Dynamic-MoE")
    assert dyn.verdict == "unresolved (no data)" and dyn.test == "Dynamic-MoE not evaluated" and dyn.group == ""
    # claims without any data: one row each
    for claim in ("fig4-alloc-l-vs-layer-baselines", "table2-k-base-1-near-best", "table3-calibration-insensitive",
                  "fig5-speedup-as-lexi", "fig8-js-small"):
        r = _row(df, claim)
        assert r.verdict == "unresolved (no data)" and r.test == "no data" and r.model == ""


def test_unresolved_when_the_difference_is_within_the_noise(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    _write(d, "Uniform", 4, {"t_math": _base()})
    swapped = _base()
    swapped[0], swapped[-1], swapped[-2] = 0, 1, 1  # one item lost, two gained
    _write(d, "Alloc-MoE", 4, {"t_math": swapped})
    r = _row(claims_table([d], k_base=1, calibration="cal"), "fig3-alloc-moe-vs-baselines", group="Math",
             comparison="Alloc-MoE vs Uniform")
    assert r.effect == pytest.approx(1.0) and r.ci_low < 0 < r.ci_high and r.verdict == "unresolved"


def test_clustered_items_are_resampled_by_the_fact_they_ask_about(tmp_path):
    """emb_world's items are clustered by the world's fact they ask about (labels from the suite's task file): the
    same per-item results then give a wider interval, and the test column says so."""
    from alloc_moe.data.tasks import embedded
    from alloc_moe.report.claims import item_clusters

    suite = tmp_path / "tasks"
    embedded.write_suite(suite, version=3, items={t: 100 for t in embedded.ITEMS_V3})
    clusters = item_clusters([suite, tmp_path / "no-such-folder"])
    facts = clusters["emb_world"]
    assert list(clusters) == ["emb_world"] and len(facts) == 100 and 20 <= len(set(facts)) <= 48
    items = [json.loads(x) for x in (suite / "emb_world.jsonl").read_text().splitlines()]
    from alloc_moe.data import synthetic as syn

    for it, f in zip(items, facts):  # every item of a fact has the world's same answer
        noun, cls = f.split()
        assert it["choices"][it["gold"]] == syn.WORLD[(noun, cls)]
    # A right on every item of the first 5 facts, B wrong there; elsewhere both alike
    bad = set(sorted(set(facts))[:5])
    a = [1 if f in bad else i % 2 for i, f in enumerate(facts)]
    b = [0 if f in bad else i % 2 for i, f in enumerate(facts)]
    d = tmp_path / "e"
    d.mkdir()
    TASKS["emb_world"] = "NLU"
    try:
        _write(d, "Uniform", 4, {"emb_world": b})
        _write(d, "Alloc-MoE", 4, {"emb_world": a})
        kw = dict(k_base=1, calibration="cal")
        pick = dict(group="NLU", comparison="Alloc-MoE vs Uniform")
        plain = _row(claims_table([d], **kw), "fig3-alloc-moe-vs-baselines", **pick)
        clus = _row(claims_table([d], **kw, clusters=clusters), "fig3-alloc-moe-vs-baselines", **pick)
    finally:
        del TASKS["emb_world"]
    assert plain.effect == clus.effect == pytest.approx(100 * sum(f in bad for f in facts) / 100)
    assert clus.se_paired > 1.5 * plain.se_paired and clus.ci_high - clus.ci_low > 1.5 * (plain.ci_high - plain.ci_low)
    assert clus.test == "paired bootstrap over items (emb_world: over the facts asked)"
    assert plain.test == "paired bootstrap over items"
    with pytest.raises(AllocMoeError, match="emb_world: 100 per-item results but only 50 items in its task file"):
        claims_table([d], **kw, clusters={"emb_world": facts[:50]})


def test_seeds_are_paired_and_resampled(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    for seed, k in ((0, 10), (1, 30)):
        _write(d, "Uniform", 4, {"t_math": _base()}, seed=seed)
        _write(d, "Alloc-MoE", 4, {"t_math": _better(k)}, seed=seed)
    r = _row(claims_table([d], k_base=1, calibration="cal"), "fig3-alloc-moe-vs-baselines", group="Math",
             comparison="Alloc-MoE vs Uniform")
    assert r.effect == pytest.approx(20.0) and r.seeds == 2 and r.test == "paired bootstrap over items and seeds"
    assert 5.0 <= r.ci_low < 10.0 and 30.0 < r.ci_high <= 35.0  # drawn seeds span 10..30, plus the items' noise


def test_without_per_item_results_the_effect_is_shown_and_unresolved(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    _write(d, "Uniform", 4, {"t_math": _base()}, per_item=False)
    _write(d, "Alloc-MoE", 4, {"t_math": _better(20)}, per_item=False)
    r = _row(claims_table([d], k_base=1, calibration="cal"), "fig3-alloc-moe-vs-baselines", group="Math",
             comparison="Alloc-MoE vs Uniform")
    assert r.effect == pytest.approx(20.0) and math.isnan(r.ci_low)
    assert r.verdict == "unresolved (no per-item results)" and r.test == "point: no per-item results"


def test_layer_and_latency_claims(evals):
    lb = pd.DataFrame([{"model": "m", "plan": "alloc-l__alloc-t__kb1__cal__B4", "layer_method": "alloc-l",
                        "token_allocation": "alloc-t", "budget": 4.0, "layer": layer, "metric": metric, "value": v,
                        "seed": 0}
                       for metric, vals in {"spearman": [0.99, 0.95, 0.97], "js_divergence_weighted": [0.01, 0.02, 0.0],
                                            "experts_entropy_spearman": [0.9, 0.8, 0.85],
                                            "entropy_delta": [-0.01, 0.04, -0.03]}.items()
                       for layer, v in enumerate(vals)])
    lat = pd.DataFrame([{"model": "m", "plan": p, "layer_method": lm, "token_allocation": tk, "budget": 4.0,
                         "phase": ph, "speedup": s, "ideal_speedup": 1.5, "seed": 0}
                        for p, lm, tk, s in (("lexi__topk__kb1__none__B4", "lexi", "topk", 1.4),
                                             ("alloc-l__alloc-t__kb1__cal__B4", "alloc-l", "alloc-t", 1.05))
                        for ph in ("prefill", "decode")])
    df = claims_table([evals], k_base=1, calibration="cal", latency=lat, load_balance=lb)
    r = _row(df, "fig8-load-order-preserved")
    assert r.effect == 0.95 and r.verdict == "holds (point)" and r.n_items == 3
    assert _row(df, "fig8-js-small").verdict == "does not hold (point)"  # 0.02 in one layer > 0.014
    r = _row(df, "fig8-entropy-kept")  # the layer farthest from 0, either sign
    assert r.effect == 0.04 and r.verdict == "does not hold (point)"
    e = _row(df, "fig12-experts-follow-entropy")
    assert e.effect == pytest.approx(0.85) and 0.8 <= e.ci_low <= e.ci_high <= 0.9 and e.verdict == "holds"
    r = _row(df, "fig5-speedup-as-lexi", group="prefill")
    assert r.effect == pytest.approx(1.05 / 1.4 - 1) and r.verdict == "does not hold (point)"
    r = _row(df, "fig5-speedup-near-ideal", group="decode")  # no per-run interval in this latency table: point
    assert r.effect == pytest.approx(1.05 / 1.5 - 1) and r.verdict == "does not hold (point)" and math.isnan(r.ci_low)


def test_speedup_near_ideal_takes_the_runs_interval():
    """Against the ideal, a latency claim's interval is the speedup's own run interval over the ideal (one seed), the
    mean of the seeds' bounds over several; the verdict follows the interval, hand-computed here."""
    def lat(rows):
        return pd.DataFrame([{"model": "m", "plan": "alloc-l__alloc-t__kb1__cal__B4", "layer_method": "alloc-l",
                              "token_allocation": "alloc-t", "budget": 4.0, "phase": "decode", "speedup": s,
                              "speedup_lo": lo, "speedup_hi": hi, "speedup_level": 0.96875, "ideal_speedup": 2.0,
                              "seed": seed} for seed, (s, lo, hi) in enumerate(rows)])

    df = claims_table([], k_base=1, calibration="cal", latency=lat([(1.7, 1.62, 1.72)]))
    r = _row(df, "fig5-speedup-near-ideal", group="decode")  # region >= -0.2: 0.81-1 .. 0.86-1 all inside
    assert (r.effect, r.ci_low, r.ci_high) == pytest.approx((-0.15, -0.19, -0.14)) and r.verdict == "holds"
    assert r.test == "per-run ratios: median interval (96.9%)"
    r = _row(claims_table([], k_base=1, calibration="cal", latency=lat([(1.7, 1.5, 1.72)])), "fig5-speedup-near-ideal")
    assert r.ci_low == pytest.approx(-0.25) and r.verdict == "unresolved"  # straddles -0.2
    r = _row(claims_table([], k_base=1, calibration="cal", latency=lat([(1.5, 1.4, 1.55)])), "fig5-speedup-near-ideal")
    assert r.ci_high == pytest.approx(-0.225) and r.verdict == "does not hold"
    r = _row(claims_table([], k_base=1, calibration="cal", latency=lat([(1.7, 1.62, 1.72), (1.5, 1.4, 1.56)])),
             "fig5-speedup-near-ideal")
    assert (r.effect, r.ci_low, r.ci_high) == pytest.approx((-0.2, -0.245, -0.18)) and r.seeds == 2
    assert r.verdict == "unresolved" and r.test.endswith("the mean of 2 seeds' bounds")
    r = _row(claims_table([], k_base=1, calibration="cal", latency=lat([(1.7, 1.62, 1.72)])), "fig5-speedup-as-lexi")
    assert r.verdict == "unresolved (no data)"  # no LExI timed


def test_claims_csv_is_byte_stable_and_fidelity_sections(evals, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_csv(claims_table([evals], k_base=1, calibration="cal"), a)
    write_csv(claims_table(sorted(evals.glob("*.json"))[::-1], k_base=1, calibration="cal"), b)
    assert a.read_bytes() == b.read_bytes()
    df = pd.read_csv(a)
    text = claims_summary(df) + claims_details(df)
    assert all(c.id in text for c in CLAIMS) and "| fig3-alloc-moe-vs-baselines |" in text


def test_eval_files_expands_directories(evals):
    files = sorted(evals.glob("*.json"))
    assert eval_files([evals]) == files and eval_files([str(files[0])]) == files[:1]


def test_resolution_counts_rows_that_resolve_the_difference_per_group():
    """R2 per group over Figs. 3, 4 and 6's rows, hand-computed: 1.96 x SE <= 1 <=> SE <= 0.5102; other claims and rows
    without a paired SE are left out."""
    rows = [("fig3-alloc-moe-vs-baselines", "NLU", 0.30), ("fig4-alloc-l-vs-layer-baselines", "NLU", 0.52),
            ("fig6-alloc-t-vs-token-baselines", "NLU", 0.50), ("fig3-alloc-moe-vs-baselines", "Math", 0.10),
            ("fig3-alloc-moe-vs-baselines", "Math", float("nan")), ("table4-l-improves-uniform", "mean", 0.90),
            ("fig3-alloc-moe-vs-baselines", "mean", 0.20), ("fig5-speedup-near-ideal", "decode", 0.01)]
    df = pd.DataFrame([{"claim": c, "group": g, "se_paired": se} for c, g, se in rows])
    r = resolution(df)
    assert r.to_dict("records") == [{"group": "NLU", "rows": 3, "median_se": 0.50, "resolved": 2},
                                    {"group": "Math", "rows": 1, "median_se": 0.10, "resolved": 1},
                                    {"group": "mean", "rows": 1, "median_se": 0.20, "resolved": 1}]
    assert resolution(df, difference=0.5).resolved.tolist() == [0, 1, 1]  # NLU: 1.96 x 0.30 = 0.588 > 0.5
    blank = df.assign(se_paired=df.se_paired.map(lambda v: "" if v != v else str(v)))  # as read keep_default_na=False
    assert resolution(blank).equals(r)
    text = resolution_summary(df)
    assert "| NLU | 3 | 0.500 | 2 | not met |" in text and "| Math | 1 | 0.100 | 1 | met |" in text


def test_seed_resolution_is_each_seed_alone_and_pools_as_the_claims_table(tmp_path):
    """Per seed, the same rows as the claims table on that seed's evals alone; over the seeds a row's SE is
    sqrt(sum of the seeds' squared SEs) / k."""
    d = tmp_path / "e"
    d.mkdir()
    for seed, k, lost in ((0, 4, 0), (1, 30, 20)):  # seed 1's plan flips many more answers: a larger SE
        alloc = _better(k)
        alloc[:lost] = [0] * lost
        _write(d, "Uniform", 4, {"t_nlu": _base(), "t_math": _base()}, seed=seed)
        _write(d, "Alloc-MoE", 4, {"t_nlu": _base(), "t_math": alloc}, seed=seed)
        _write(d, "LExI", 4, {"t_nlu": _better(1), "t_math": _base()}, seed=seed)
    per_seed = seed_resolution([d], k_base=1, calibration="cal")
    assert per_seed.seed.tolist() == [0, 0, 0, 1, 1, 1]
    for seed in (0, 1):
        alone = tmp_path / f"s{seed}"
        alone.mkdir()
        for f in d.glob(f"*__s{seed}.json"):
            (alone / f.name).write_bytes(f.read_bytes())
        expect = resolution(claims_table([alone], k_base=1, calibration="cal"))
        got = per_seed[per_seed.seed == seed].drop(columns="seed").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expect, check_dtype=False)
    both = _row(claims_table([d], k_base=1, calibration="cal"), "fig3-alloc-moe-vs-baselines", group="Math",
                comparison="Alloc-MoE vs Uniform").se_paired
    one = [_row(claims_table(sorted(d.glob(f"*__s{s}.json")), k_base=1, calibration="cal"),
                "fig3-alloc-moe-vs-baselines", group="Math", comparison="Alloc-MoE vs Uniform").se_paired for s in (0, 1)]
    assert both == pytest.approx(math.sqrt(one[0] ** 2 + one[1] ** 2) / 2)
    assert one[1] > 2 * one[0]
    text = resolution_summary(claims_table([d], k_base=1, calibration="cal"), per_seed=per_seed)
    assert "| seed | NLU | Math | mean |" in text and text.count("\n| 0 | ") == 1 and text.count("\n| 1 | ") == 1
    assert "| seed |" not in resolution_summary(claims_table([d], k_base=1, calibration="cal"),
                                                 per_seed=per_seed[per_seed.seed == 0])
    entries = load_entries([d])  # the claims rule reads the files once and passes the entries to both
    pd.testing.assert_frame_equal(claims_table(entries, k_base=1, calibration="cal"),
                                  claims_table([d], k_base=1, calibration="cal"))
    pd.testing.assert_frame_equal(seed_resolution(entries, k_base=1, calibration="cal"), per_seed)
