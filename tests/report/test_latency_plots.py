"""The latency and load-balance figures render from small hand-made tables (PNG written atomically)."""

import pandas as pd

from alloc_moe.core.plan import Plan
from alloc_moe.report import plots
from alloc_moe.stages.latency import speedup_frame


def summary():
    def entry(plan, layer, token, budget, s):
        return {"plan": plan, "layer_method": layer, "token_allocation": token, "budget": budget,
                "phases": {ph: {"median_ms": 10 / s, "speedup": s, "ideal_speedup": s + 0.1} for ph in ("prefill", "decode")}}

    return {"model": "m", "plans": [entry("original", "original", "topk", 12, 1.0), entry("a", "uniform", "topk", 6, 1.2),
                                    entry("b", "uniform", "topk", 9, 1.1), entry("c", "alloc-l", "alloc-t", 6, 1.15)]}


def test_speedup_frame_and_figure(tmp_path):
    df = speedup_frame(summary())
    assert len(df) == 8 and set(df["method"]) == {"original", "uniform+topk", "alloc-l+alloc-t"}
    plots.speedup_vs_budget(df, tmp_path / "f5.png")
    assert (tmp_path / "f5.png").stat().st_size > 1000


def test_speedup_figure_with_intervals_and_unresolved_points(tmp_path):
    s = summary()
    for e in s["plans"]:
        for ph, d in e["phases"].items():
            d.update(speedup_lo=d["speedup"] - 0.1, speedup_hi=d["speedup"] + 0.1, speedup_level=0.97,
                     resolved=e["plan"] != "b")
    df = speedup_frame(s)
    assert list(df.loc[df.plan == "b", "resolved"]) == [False, False]
    assert df.loc[df.plan == "a", "speedup_hi"].tolist() == [1.3, 1.3]
    plots.speedup_vs_budget(df, tmp_path / "f5.png")
    assert (tmp_path / "f5.png").stat().st_size > 1000


def test_load_balance_figures(tmp_path):
    loads = pd.DataFrame([{"model": "m", "plan": p, "layer": 1, "expert": e, "load": e + (p == "x"), "weighted_load": 1.0}
                          for p in ("original", "x") for e in range(8)])
    metrics = pd.DataFrame([{"model": "m", "plan": "x", "layer": lay, "metric": m, "value": 0.1 * lay}
                            for lay in (1, 2) for m in ("spearman", "entropy_delta", "js_divergence", "experts_per_token")])
    tokens = pd.DataFrame([{"model": "m", "plan": "x", "layer": 1, "experts": n, "tokens": 5, "entropy_mean": n,
                            "entropy_q25": n - 0.5, "entropy_median": n, "entropy_q75": n + 0.5} for n in (1, 2, 3)])
    plan = Plan(model="m", moe_layers=[1, 2, 3], k_orig=6, budget=9.0, layer_method="alloc-l", k_per_layer=[4, 3, 2])
    for name, draw in {"f7": lambda p: plots.expert_load(loads, p, plan="x", layer=1),
                       "f8": lambda p: plots.load_balance_by_layer(metrics, p, plan="x"),
                       "f12a": lambda p: plots.plan_allocation(plan, p),
                       "f12b": lambda p: plots.experts_vs_entropy(tokens, p, plan="x")}.items():
        draw(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
