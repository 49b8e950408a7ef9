"""Latency measurement (`alloc_moe.stages.latency`): phase separation and CSV schema on a tiny model with a fake clock that
advances a fixed amount per forward (no timing thresholds), interleaving, the ideal speedup, the speedup summary and
one-line errors before any model is loaded."""

import json

import pandas as pd
import pytest
import torch

from alloc_moe.backends.hf import latency as hf_latency
from alloc_moe.backends.hf.apply import moe_layers
from alloc_moe.backends.hf.latency import measure_hf
from alloc_moe.cli import main
from alloc_moe.core.plan import Plan
from alloc_moe.data import zoo
from alloc_moe.stages import latency
from alloc_moe.stages.latency import (
    BackendResult,
    Protocol,
    ideal_speedup,
    summarize,
)

B, P, D = 2, 5, 3


def tiny():
    return zoo.make_model("deepseek_v2", layers=3, seed=0)  # MoE layers 1, 2; K_orig 2; 8 experts


def plan_for(model, ks, mode="topk"):
    layers = moe_layers(model)
    return Plan(model="t", moe_layers=[m.index for m in layers], k_orig=layers[0].k_orig, budget=float(sum(ks)),
                layer_method="uniform", k_per_layer=list(ks), token_allocation=mode)


class FakeClock:
    """perf_counter that advances 1 s per model forward and 0.25 s per routed-experts call."""

    def __init__(self, model):
        self.now = 0.0
        model.register_forward_pre_hook(lambda *a: self.tick(1.0))
        for m in moe_layers(model):
            m.experts.register_forward_hook(lambda *a: self.tick(0.25))  # runs before the timer's exit hook

    def tick(self, s):
        self.now += s

    def __call__(self):
        return self.now


def test_phases_are_separate_and_decode_is_per_step(monkeypatch):
    model = tiny()
    clock = FakeClock(model)
    monkeypatch.setattr(hf_latency.time, "perf_counter", clock)
    plans = [("original", None), ("half", plan_for(model, [1, 1]))]
    res = measure_hf(model, plans, Protocol(batch=B, prompt=P, decode=D, warmup=1, runs=2))
    per_forward = 1000.0 + 2 * 250.0  # one forward = 1 s + two MoE layers x 0.25 s
    assert len(res.rows) == 2 * 2 * 2  # labels x phases x timed runs
    for r in res.rows:
        assert r["ms"] == pytest.approx(per_forward)  # prefill = 1 forward; decode = D forwards / D steps
    assert res.expert_share == {"prefill": pytest.approx(0.5 / 1.5), "decode": pytest.approx(0.5 / 1.5)}
    assert {(r["plan"], r["phase"], r["run"]) for r in res.rows} == {
        (p, ph, i) for p in ("original", "half") for ph in ("prefill", "decode") for i in (0, 1)}


def test_prefill_builds_the_cache_and_decode_steps_on_it():
    model = tiny()
    calls = []
    model.register_forward_pre_hook(
        lambda mod, args, kw: calls.append((tuple(kw["input_ids"].shape),
                                            kw["past_key_values"].get_seq_length() if kw.get("past_key_values") else 0)),
        with_kwargs=True)
    measure_hf(model, [("original", None)], Protocol(batch=B, prompt=P, decode=D, warmup=0, runs=1))
    one_generation = [((B, P), 0)] + [((B, 1), P + i) for i in range(D)]
    assert calls == one_generation * 2  # the timed run, then the instrumented expert-share run


def test_runs_are_interleaved_in_rotating_order():
    model = tiny()
    gate = moe_layers(model)[0].gate
    order = []
    model.register_forward_pre_hook(
        lambda mod, args, kw: order.append(gate.top_k) if kw["input_ids"].shape[1] == P else None, with_kwargs=True)
    plans = [("original", None), ("k1", plan_for(model, [1, 1]))]
    measure_hf(model, plans, Protocol(batch=B, prompt=P, decode=1, warmup=1, runs=2))
    assert order[:6] == [2, 1, 1, 2, 2, 1]  # run 0: original first, run 1: k1 first, run 2: original first
    assert gate.top_k == 2  # plans removed after each run


def test_csv_schema_and_summary_from_cli(tmp_path):
    model_dir = tmp_path / "m"
    zoo.write_model(model_dir, arch="deepseek_v2", layers=3)
    model = zoo.make_model("deepseek_v2", layers=3)
    plan_for(model, [1, 1]).save(tmp_path / "half.json")
    plan_for(model, [1.5, 1.5], "alloc-t").save(tmp_path / "half_t.json")
    out = tmp_path / "lat.csv"
    rc = main(["latency", "--model", str(model_dir), "--plans", "original", str(tmp_path / "half.json"),
               str(tmp_path / "half_t.json"), "--batch", "2", "--prompt", "4", "--decode", "2", "--warmup", "0",
               "--runs", "2", "--threads", "1", "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out)
    assert list(df.columns) == latency.CSV_COLUMNS
    assert len(df) == 3 * 2 * 2
    assert set(df["phase"]) == {"prefill", "decode"} and (df["ms"] > 0).all()
    assert df.set_index("plan")["budget"].to_dict() == {"original": 4.0, "half": 2.0, "half_t": 3.0}
    s = json.loads(out.with_suffix(".json").read_text())
    assert {"device", "dtype", "threads", "environment", "expert_share", "protocol"} <= set(s)
    assert s["dtype"] == "float32" and s["threads"] == 1
    half = next(p for p in s["plans"] if p["plan"] == "half")
    assert half["budget_ratio"] == 0.5
    assert set(half["phases"]) == {"prefill", "decode"}
    assert {"median_ms", "min_ms", "max_ms", "speedup", "ideal_speedup"} <= set(half["phases"]["decode"])


def test_ideal_speedup_is_amdahl():
    assert ideal_speedup(0.5, 0.5) == pytest.approx(1 / 0.75)
    assert ideal_speedup(0.0, 0.1) == 1.0
    assert ideal_speedup(1.0, 0.25) == pytest.approx(4.0)


def test_summary_speedup_is_the_median_of_per_run_ratios():
    model = tiny()
    half = plan_for(model, [1, 1])
    ms = {"original": [10.0, 20.0, 30.0], "half": [5.0, 20.0, 10.0]}  # per-run ratios 2, 1, 3 -> median 2
    rows = [{"plan": p, "phase": ph, "run": i, "ms": v} for p, vs in ms.items() for ph in ("prefill", "decode")
            for i, v in enumerate(vs)]
    csv_rows, s = summarize(BackendResult(rows, {"prefill": 0.5, "decode": 0.8}, "cpu", "float32"),
                            [("original", None), ("half", half)])
    h = s["plans"][1]["phases"]["decode"]
    assert h["speedup"] == 2.0 and h["speedup_min"] == 2.0 and h["median_ms"] == 10.0 and h["min_ms"] == 5.0 and h["max_ms"] == 20.0
    assert h["ideal_speedup"] == pytest.approx(1 / (0.2 + 0.4))
    assert csv_rows[0]["layer_method"] == "original" and csv_rows[0]["budget"] == 4


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("alloc_moe.backends.hf.loading.load_model", fail)


@pytest.mark.parametrize("extra, needle", [
    (["--batch", "0"], "batch must be a positive integer"),
    (["--decode", "-1"], "decode must be a positive integer"),
    (["--prompt", "0"], "prompt must be a positive integer"),
    (["--runs", "0"], "runs must be a positive integer"),
    (["--warmup", "-1"], "warmup must be an integer >= 0"),
    (["--backend", "vllm-nope"], "unknown backend 'vllm-nope'; allowed: hf, vllm"),
    (["--dtype", "float8"], "unknown dtype"),
])
def test_bad_protocol_is_one_line_before_loading(tmp_path, capsys, no_model_load, extra, needle):
    model_dir = tmp_path / "m"
    zoo.write_model(model_dir, arch="deepseek_v2", layers=3)
    out = tmp_path / "lat.csv"
    rc = main(["latency", "--model", str(model_dir), "--plans", "original", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_missing_plan_and_plan_for_another_model(tmp_path, capsys, no_model_load):
    model_dir = tmp_path / "m"
    zoo.write_model(model_dir, arch="deepseek_v2", layers=3)
    other = zoo.make_model("deepseek_v2", layers=4)  # MoE layers 1..3
    plan_for(other, [1, 1, 1]).save(tmp_path / "other.json")
    out = tmp_path / "lat.csv"
    for plan, needle in ((tmp_path / "nope.json", "plan file not found"), (tmp_path / "other.json", "does not fit")):
        rc = main(["latency", "--model", str(model_dir), "--plans", str(plan), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_bf16_runs():
    model = tiny().to(torch.bfloat16)
    res = measure_hf(model, [("original", None)], Protocol(batch=1, prompt=3, decode=1, warmup=0, runs=1))
    assert res.dtype == "bfloat16" and len(res.rows) == 2
