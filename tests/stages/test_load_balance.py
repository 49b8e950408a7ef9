"""Load-balance metrics (`alloc_moe.stages.load_balance`) against hand-computed values and scipy, and the collection from
the HF backend's routing statistics on a tiny model."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy
from scipy.stats import spearmanr

from alloc_moe import AllocMoeError
from alloc_moe.backends.hf.apply import moe_layers
from alloc_moe.cli import main
from alloc_moe.core.plan import Plan
from alloc_moe.data import zoo
from alloc_moe.data.text import Windows
from alloc_moe.stages.load_balance import collect, compare, layer_metrics, spearman


def test_identical_loads():
    c = compare([5, 1, 3, 3], [5, 1, 3, 3])
    assert c["spearman"] == pytest.approx(1.0) and c["js_divergence"] == 0.0 and c["entropy_delta"] == 0.0


def test_hand_computed_values():
    c = compare([1, 0], [0, 1])  # disjoint supports: JS = 1 bit; both fully concentrated: entropy 0
    assert c["js_divergence"] == pytest.approx(1.0) and c["spearman"] == pytest.approx(-1.0)
    assert c["entropy_a"] == 0.0 and c["entropy_b"] == 0.0
    c = compare([1, 1, 1, 1], [2, 0, 0, 0])  # uniform -> 1; one-hot -> 0; spearman undefined (constant a)
    assert c["entropy_a"] == pytest.approx(1.0) and c["entropy_delta"] == pytest.approx(-1.0)
    assert math.isnan(c["spearman"])
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = (0.5 log2(2/3) + 0.5 log2(2) + log2(4/3)) / 2
    c = compare([1, 1], [1, 0])
    assert c["js_divergence"] == pytest.approx((0.5 * math.log2(2 / 3) + 0.5 + math.log2(4 / 3)) / 2)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(spearmanr([1, 2, 2, 3], [1, 2, 3, 4]).statistic)


loads = st.lists(st.integers(0, 50), min_size=2, max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_against_scipy(data):
    a = data.draw(loads.filter(lambda x: sum(x) > 0))
    b = data.draw(st.lists(st.integers(0, 50), min_size=len(a), max_size=len(a)).filter(lambda x: sum(x) > 0))
    c = compare(a, b)
    p, q = np.array(a) / sum(a), np.array(b) / sum(b)
    assert c["js_divergence"] == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)
    assert c["entropy_a"] == pytest.approx(scipy_entropy(p) / math.log(len(a)), abs=1e-12)
    assert c["entropy_delta"] == pytest.approx((scipy_entropy(q) - scipy_entropy(p)) / math.log(len(a)), abs=1e-12)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on a constant input (NaN is what we check)
        ref = spearmanr(a, b).statistic
    if np.isnan(ref):
        assert math.isnan(c["spearman"])
    else:
        assert c["spearman"] == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("a, b, needle", [
    ([1, 2], [1, 2, 3], "differ in length"),
    ([1, -1], [1, 1], "non-negative"),
    ([0, 0], [1, 1], "no load"),
    ([1], [1], "at least 2"),
    ([1, float("nan")], [1, 1], "finite"),
])
def test_bad_input(a, b, needle):
    with pytest.raises(AllocMoeError, match=needle):
        compare(a, b)


# ------------------------------------------------------------------------------------------------ collection


def tiny():
    return zoo.make_model("olmoe", layers=2, router_std=1.0, seed=0, overrides={"num_experts_per_tok": 4})


def plan_for(model, ks, mode):
    layers = moe_layers(model)
    return Plan(model="t", moe_layers=[m.index for m in layers], k_orig=4, budget=float(sum(ks)),
                layer_method="uniform", k_per_layer=list(ks), token_allocation=mode)


WINDOWS = Windows(torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0)), ["x"] * 6)


def test_collection_counts_what_was_computed():
    model = tiny()
    T = WINDOWS.input_ids.numel()
    orig = collect(model, WINDOWS)
    topk = collect(model, WINDOWS, plan_for(model, [2, 2], "topk"))
    allt = collect(model, WINDOWS, plan_for(model, [2, 2], "alloc-t"))
    for layer, lr in orig.items():
        assert lr.loads.sum() == T * 4 and (lr.experts == 4).all() and lr.entropy.shape == (T,)
        assert 0 < lr.weighted_loads.sum() <= T  # top-4 softmax weights, not renormalised: < 1 per token
        m = layer_metrics(lr, lr)
        assert m["spearman"] == pytest.approx(1.0) and m["js_divergence"] == 0.0 and m["entropy_delta"] == 0.0
    for layer in orig:
        assert topk[layer].loads.sum() == T * 2 and (topk[layer].experts == 2).all()
        assert allt[layer].loads.sum() == T * 2 and allt[layer].experts.sum() == T * 2
        assert allt[layer].experts.min() >= 1  # k_base = 1
        assert allt[layer].weighted_loads.sum() < orig[layer].weighted_loads.sum()
        assert math.isnan(layer_metrics(orig[layer], topk[layer])["experts_entropy_spearman"])
        assert layer_metrics(orig[layer], allt[layer])["experts_entropy_spearman"] > 0  # more experts when unsure


def test_cli_writes_tidy_tables(tmp_path):
    model_dir = tmp_path / "m"
    model = zoo.write_model(model_dir, arch="olmoe", layers=2, router_std=1.0, overrides={"num_experts_per_tok": 4})
    plan_for(model, [2, 2], "alloc-t").save(tmp_path / "t.json")
    plan_for(model, [2, 2], "topk").save(tmp_path / "k.json")  # experts_entropy_spearman all NaN: still printed
    calib = tmp_path / "c.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out, loads, tokens = tmp_path / "lb.csv", tmp_path / "loads.csv", tmp_path / "tok.csv"
    rc = main(["load-balance", "--model", str(model_dir), "--calib", str(calib), "--seq-len", "16", "--plans",
               str(tmp_path / "t.json"), str(tmp_path / "k.json"), "--model-name", "tiny", "--no-progress", "--out", str(out),
               "--loads", str(loads), "--tokens", str(tokens)])
    assert rc == 0
    df = pd.read_csv(out)
    assert list(df.columns) == ["model", "plan", "layer_method", "token_allocation", "budget", "layer", "metric", "value"]
    assert set(df["metric"]) == {"spearman", "entropy_original", "entropy_plan", "entropy_delta", "js_divergence",
                                 "js_divergence_weighted", "experts_per_token", "experts_entropy_spearman"}
    assert set(df["layer"]) == {0, 1} and set(df["model"]) == {"tiny"} and set(df["plan"]) == {"t", "k"}
    assert df[(df.plan == "k") & (df.metric == "experts_entropy_spearman")]["value"].isna().all()
    ld = pd.read_csv(loads)
    assert set(ld["plan"]) == {"original", "t", "k"} and len(ld) == 3 * 2 * 8
    tk = pd.read_csv(tokens)
    assert tk.groupby(["plan", "layer"])["tokens"].sum().nunique() == 1  # every run routes the same tokens


def test_cli_bad_plan_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("alloc_moe.backends.hf.loading.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    model_dir = tmp_path / "m"
    zoo.write_model(model_dir, arch="olmoe", layers=2)
    plan_for(zoo.make_model("olmoe", layers=3, overrides={"num_experts_per_tok": 4}), [2, 2, 2], "topk").save(tmp_path / "p.json")
    out = tmp_path / "lb.csv"
    rc = main(["load-balance", "--model", str(model_dir), "--calib", str(tmp_path / "c.txt"), "--plans",
               str(tmp_path / "p.json"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_with_only_topk_plans(tmp_path):
    """experts_entropy_spearman is NaN for every row (constant counts): the summary still prints."""
    model = zoo.write_model(tmp_path / "m", arch="olmoe", layers=2, router_std=1.0, overrides={"num_experts_per_tok": 4})
    plan_for(model, [2, 2], "topk").save(tmp_path / "k.json")
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 10)
    rc = main(["load-balance", "--model", str(tmp_path / "m"), "--calib", str(tmp_path / "c.txt"), "--seq-len", "16",
               "--plans", str(tmp_path / "k.json"), "--no-progress", "--out", str(tmp_path / "lb.csv")])
    assert rc == 0
