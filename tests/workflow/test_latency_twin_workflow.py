"""Dry runs: the embedded default's latency rule times the trained model's latency twin (rule make_twin), a config
with `latency.model: model` times the model itself, `latency.threads` sets the job's torch threads, and nothing but
the latency rule reads the twin."""

import pytest
from helpers import dry_run_jobs, snakemake_over_default


def _dry(tmp_path, extra: str = ""):
    cfg = tmp_path / "over.yaml"
    cfg.write_text(extra or "{}\n")
    res = snakemake_over_default(tmp_path, [cfg], "-n", "-p", "--cores", "2", "results/embedded-s0/latency/latency.json",
                                 "results/embedded-s0/eval/B12")
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_default_latency_rule_times_the_twin(tmp_path):
    out = _dry(tmp_path)
    counts, outputs = dry_run_jobs(out)
    assert counts["make_twin"] == 1 and outputs["make_twin"] == ["results/embedded-s0/twin"]
    cmds = [line for line in out.splitlines() if "alloc-moe " in line]
    twin = [c for c in cmds if "alloc-moe make-twin" in c]
    assert twin and "--model results/embedded-s0/model --hidden-size 512 --expert-size 512 --seed 0" in twin[0]
    lat = [c for c in cmds if "alloc-moe latency" in c]
    assert lat and "--model results/embedded-s0/twin " in lat[0] and "--decode 16" in lat[0] and "--runs 9" in lat[0] and "--threads $(( 1 > 0 && 1 < 2 ? 1 : 2 )) " in lat[0]
    assert not [c for c in cmds if "results/embedded-s0/twin" in c and "alloc-moe latency" not in c
                and "make-twin" not in c]  # the twin feeds the latency job only


@pytest.mark.slow
def test_latency_model_setting_times_the_model_itself(tmp_path):
    out = _dry(tmp_path, "latency: {model: model, threads: 1}\n")
    counts, _ = dry_run_jobs(out)
    assert "make_twin" not in counts
    lat = [line for line in out.splitlines() if "alloc-moe latency" in line]
    assert lat and "--model results/embedded-s0/model " in lat[0] and "--threads $(( 1 > 0 && 1 < 2 ? 1 : 2 )) " in lat[0]


def test_unknown_latency_model_is_refused(tmp_path):
    cfg = tmp_path / "over.yaml"
    cfg.write_text("latency: {model: wide}\n")
    res = snakemake_over_default(tmp_path, [cfg])
    assert res.returncode != 0 and "latency.model" in (res.stdout + res.stderr).replace("'", "").replace('"', "")
