"""The latency twin (`alloc_moe.data.twin`, `alloc-moe make-twin`): a model's topology at another width, whose plans
apply unchanged; and the speedup interval / resolved flag of `alloc_moe.stages.latency` against hand-computed cases."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alloc_moe.backends.hf.apply import apply, moe_layers
from alloc_moe.cli import main
from alloc_moe.core.plan import Plan
from alloc_moe.data import twin, zoo
from alloc_moe.errors import AllocMoeError
from alloc_moe.stages.latency import BackendResult, median_interval, resolved, summarize


def topology(model):
    layers = moe_layers(model)
    return (model.config.model_type, model.config.num_hidden_layers, [m.index for m in layers],
            zoo.num_experts(model), zoo.k_orig(model))


@pytest.mark.parametrize("arch", sorted(twin.EXPERT_WIDTH_FIELD))
def test_twin_keeps_topology_at_other_width(arch):
    model = zoo.make_model(arch, layers=3, seed=0)
    t = twin.make_twin(model.config, hidden_size=128, expert_size=48, seed=0)
    assert topology(t) == topology(model)
    assert t.config.hidden_size == 128 and getattr(t.config, twin.EXPERT_WIDTH_FIELD[arch]) == 48
    assert t.config.vocab_size == model.config.vocab_size
    for name in ("n_shared_experts", "first_k_dense_replace", "norm_topk_prob"):
        assert getattr(t.config, name, None) == getattr(model.config, name, None)
    assert model.config.hidden_size != 128  # the source is untouched
    plan = Plan(model="t", moe_layers=[m.index for m in moe_layers(t)], k_orig=zoo.k_orig(t),
                budget=float(len(moe_layers(t))), layer_method="uniform", k_per_layer=[1] * len(moe_layers(t)), token_allocation="topk")
    ids = torch.randint(0, t.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = t(input_ids=ids).logits
        with apply(t, plan):
            planned = t(input_ids=ids).logits
    assert planned.shape == full.shape and torch.isfinite(planned).all() and not torch.equal(planned, full)


def test_twin_of_the_embedded_layout_and_same_bytes(tmp_path):
    src = tmp_path / "src"
    zoo.write_model(src, arch="olmoe", width="small", layers=8, seed=0)  # the embedded default's topology
    for out in ("a", "b"):
        assert main(["make-twin", "--model", str(src), "--hidden-size", "128", "--expert-size", "64", "--seed", "3",
                     "--out", str(tmp_path / out)]) == 0
    meta = json.loads((tmp_path / "a" / "alloc_moe_twin.json").read_text())
    assert (meta["layers"], meta["num_experts"], meta["k_orig"], meta["moe_layers"]) == (8, 16, 4, list(range(8)))
    a, b = (load_file(tmp_path / o / "model.safetensors") for o in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(v.numel() for k, v in a.items() if ".experts." in k) == 8 * 16 * 3 * 128 * 64


def test_twin_refuses_bad_width():
    cfg = zoo.make_config("olmoe")
    with pytest.raises(AllocMoeError, match="multiple of 64"):
        twin.twin_config(cfg, hidden_size=100)
    with pytest.raises(AllocMoeError, match="expert_size"):
        twin.twin_config(cfg, expert_size=0)


# ------------------------------------------------------------------------------------------------ intervals

def test_median_interval_order_statistics():
    # n = 5: no k reaches 95%; k = 1 (the range) covers 1 - 2/32
    assert median_interval([3, 1, 2, 5, 4]) == (1, 5, 1 - 2 / 32)
    # n = 6: k = 1 covers 1 - 2/64 = 0.969; k = 2 would cover 1 - 2*7/64 = 0.78
    assert median_interval([6, 1, 5, 2, 4, 3]) == (1, 6, 1 - 2 / 64)
    # n = 9: k = 2 covers 1 - 2*(1+9)/512 = 0.961; k = 3 would cover 1 - 2*46/512 = 0.82
    lo, hi, level = median_interval(list(range(1, 10)))
    assert (lo, hi) == (2, 8) and math.isclose(level, 1 - 20 / 512)
    assert median_interval([1.5]) == (1.5, 1.5, 0.0)


def test_resolved_rule():
    assert resolved(2.0, 1.91, 2.09)  # width 0.18 <= 10% of 2.0
    assert not resolved(2.0, 1.8, 2.21)
    assert resolved(1.0, 1.0, 1.0)


def test_summary_carries_interval_and_flag():
    plan = Plan(model="t", moe_layers=[0, 1], k_orig=2, budget=2.0, layer_method="uniform", k_per_layer=[1, 1],
                token_allocation="topk")
    plans = [("original", None), ("p", plan)]
    # per-run ratios: decode 2.0, 2.0, 2.08, 1.92, 2.0 (resolved: width 0.16 <= 0.2); prefill 1, 2, 1, 3, 1 (unresolved)
    base_d, mine_d = [10, 10, 10.4, 9.6, 10], [5, 5, 5, 5, 5]
    base_p, mine_p = [4, 4, 4, 6, 4], [4, 2, 4, 2, 4]
    rows = []
    for r in range(5):
        rows += [{"plan": "original", "phase": "decode", "run": r, "ms": base_d[r]},
                 {"plan": "p", "phase": "decode", "run": r, "ms": mine_d[r]},
                 {"plan": "original", "phase": "prefill", "run": r, "ms": base_p[r]},
                 {"plan": "p", "phase": "prefill", "run": r, "ms": mine_p[r]}]
    _, s = summarize(BackendResult(rows, {"prefill": 0.5, "decode": 0.8}, "cpu", "float32"), plans)
    d, p = s["plans"][1]["phases"]["decode"], s["plans"][1]["phases"]["prefill"]
    assert (d["speedup"], d["speedup_lo"], d["speedup_hi"], d["resolved"]) == (2.0, pytest.approx(1.92),
                                                                                pytest.approx(2.08), True)
    assert (p["speedup"], p["speedup_lo"], p["speedup_hi"], p["resolved"]) == (1.0, 1.0, 3.0, False)
    assert d["speedup_level"] == 1 - 2 / 32
    o = s["plans"][0]["phases"]["decode"]
    assert (o["speedup_lo"], o["speedup_hi"], o["resolved"]) == (1.0, 1.0, True)
