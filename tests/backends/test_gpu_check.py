"""The prepared GPU check (`benchmarks/gpu_check.py`) on CPU: `--smoke` runs every section's code path at tiny sizes
and writes its results; the runner keeps sections independent (a failing one is recorded with a one-line reason and
the next still runs) and stops at the deadline."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gc(monkeypatch):
    """The script imported as a module; the env var it sets and torch's TF32 switches are restored afterwards."""
    monkeypatch.setenv("TRITON_F32_DEFAULT", os.environ.get("TRITON_F32_DEFAULT", "ieee"))
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


@pytest.mark.slow
def test_smoke_on_cpu_writes_results(tmp_path):
    out = tmp_path / "smoke"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--threads", "1",
                        "--deadline-s", "120", "--out", str(out)], check=False, capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    md = (out / "summary.md").read_text()
    assert doc["schema"] == "alloc-moe-gpu-check/1" and doc["smoke"] is True and doc["label"] == "cpu-smoke"

    env_ = doc["environment"]
    for key in ("torch", "torch_cuda", "triton", "transformers", "python", "gpu", "git_commit", "source_sha256", "tf32"):
        assert key in env_
    assert env_["tf32"]["TRITON_F32_DEFAULT"] == "ieee"
    assert env_["tf32"]["cuda.matmul.allow_tf32"] is False and env_["tf32"]["cudnn.allow_tf32"] is False

    s = doc["sections"]
    assert list(s) == ["hf-deepseek", "alloc-t-graphs", "triton-moe-kernel"]
    # the kernel section needs Triton and a vLLM fused_moe.py: in the vLLM venv it runs (interpreter), else skips
    kernel = "pass" if importlib.util.find_spec("triton") and importlib.util.find_spec("vllm") else "skipped"
    assert {k: v["status"] for k, v in s.items()} == {
        "hf-deepseek": "pass", "alloc-t-graphs": "pass", "triton-moe-kernel": kernel}
    if kernel == "skipped":
        assert "Triton" in s["triton-moe-kernel"]["reason"] or "fused_moe.py" in s["triton-moe-kernel"]["reason"]

    hf = s["hf-deepseek"]
    c = hf["config"]
    assert (c["n_routed_experts"], c["k_orig"], c["moe_layers"]) == (64, 6, [1, 2, 3])
    assert c["experts_implementation"] == "grouped_mm" and c["expert_kernels"]
    checks = hf["checks"]
    for name in ("unpatched_deterministic", "identity_topk_k_orig", "identity_alloc-t_k_orig", "identity_after_remove",
                 "rows_unpatched", "grouped_mm_kernel_used"):
        assert checks[name]["ok"], name
    T, B = 2 * 8, 2  # smoke protocol: batch 2, prompt 8
    for plan, ks in (("uniform-topk-half", [3, 3, 3]), ("uniform-alloc-t-half", [3.0] * 3),
                     ("alloc-t-fractional", [2.5, 3.25, 3.25])):
        for phase, n in (("prefill", T), ("decode", B)):
            ck = checks[f"pairs_{plan}_{phase}"]
            assert ck["ok"]
            assert ck["gemm_rows"] == {str(layer): int(n * k + 1e-9) for layer, k in zip([1, 2, 3], ks)}
    lat = hf["numbers"]["latency"]
    assert set(lat["plans"]) == {"original", "uniform-topk-half", "uniform-alloc-t-half"}
    for phase in ("prefill", "decode"):
        assert 0 < lat["expert_share"][phase] < 1
        d = lat["plans"]["uniform-topk-half"][phase]
        assert d["median_ms"] > 0 and d["ideal_speedup"] > 1

    g = s["alloc-t-graphs"]
    assert set(g["numbers"]["per_T"]) == {"8", "16"}
    assert g["checks"] and all(v["ok"] for v in g["checks"].values())
    assert {"compiled_equals_eager_full_T8", "compiled_equals_eager_slots_T16", "budget_slots_T8"} <= set(g["checks"])
    assert "no CUDA" in g["skipped"]["sync_debug"] and "no CUDA" in g["skipped"]["cuda_graphs"]
    assert g["config"]["compile_backend"] == "eager"

    assert "| hf-deepseek | pass |" in md and f"| triton-moe-kernel | {kernel} |" in md
    assert "uniform-alloc-t-half" in md and "Cost per call" in md


def test_sections_are_independent_and_reasons_one_line(gc, tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("first line\nsecond line")

    def failing(ctx):
        ctx.check("fine", True)
        ctx.check("bad", False, got=3, expected=4)
        return ctx.out

    def late(ctx):
        ctx.number("before", 1)
        ctx.need(1e9, "something huge")

    ran = []
    sections = {"boom": boom, "failing": failing, "late": late, "ok": lambda ctx: ran.append(1) or {}}
    monkeypatch.setattr(gc, "SECTIONS", sections)
    rc = gc.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--sections", "boom,failing,late,ok"])
    assert rc == 1 and ran == [1]
    s = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert s["boom"]["status"] == "error" and "\n" not in s["boom"]["reason"]
    assert s["boom"]["reason"].startswith("RuntimeError: first line (at test_gpu_check.py:")
    assert s["failing"]["status"] == "fail" and s["failing"]["reason"].startswith("1 check(s) failed, first bad: got=3")
    assert s["late"]["status"] == "deadline" and "something huge" in s["late"]["reason"]
    assert s["late"]["numbers"] == {"before": 1}  # what a section had recorded is kept
    assert s["ok"]["status"] == "pass"
    assert "| boom | error |" in (tmp_path / "summary.md").read_text()


def test_deadline_skips_sections_and_unknown_section_is_rejected(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "SECTIONS", {"a": lambda ctx: {}, "b": lambda ctx: {}})
    rc = gc.main(["--device", "cpu", "--out", str(tmp_path), "--sections", "a", "--deadline-s", "0"])
    assert rc == 0
    s = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert s == {"a": {"status": "skipped", "reason": "deadline: 0 s left", "seconds": 0.0}}
    with pytest.raises(SystemExit):
        gc.parse_args(["--sections", "a,nope"])


@pytest.mark.vllm
def test_kernel_section_runs_on_cpu_under_the_interpreter(tmp_path):
    """In the vLLM venv (Triton and vLLM's fused_moe.py there) the section runs the cut-out kernel on CPU."""
    pytest.importorskip("triton")
    pytest.importorskip("vllm")
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--sections", "triton-moe-kernel", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sec = json.loads((out / "results.json").read_text())["sections"]["triton-moe-kernel"]
    assert sec["status"] == "pass", sec
    assert {"aligned-fp32:standalone", "small-batch-fp32:standalone"} <= set(sec["checks"])
