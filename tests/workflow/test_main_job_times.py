"""benchmarks/main_job_times.py: per-rule job-seconds and the timeline from a Snakemake log, on a hand-written log."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("main_job_times", ROOT / "benchmarks/main_job_times.py")
mjt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mjt)

LOG = """\
Building DAG of jobs...
[Mon Dec  7 15:29:31 2026]
localrule train:
    output: results/embedded-s0/model
    jobid: 3
    wildcards: run=embedded-s0
[Mon Dec  7 15:29:40 2026]
rule accuracy:
    jobid: 6
    wildcards: run=embedded-s0, label=B12
[Mon Dec  7 15:34:47 2026]
Finished jobid: 3 (Rule: train)
[Mon Dec  7 15:35:00 2026]
Finished jobid: 6 (Rule: accuracy)
[Mon Dec  7 15:35:01 2026]
localrule accuracy:
    jobid: 7
    wildcards: run=embedded-s0, label=B16
[Mon Dec  7 15:35:03 2026]
Finished jobid: 7 (Rule: accuracy)
[Mon Dec  7 15:35:04 2026]
localrule all:
    jobid: 0
Elapsed time: 0:05:33.1
"""


def test_per_rule_job_seconds_and_timeline(tmp_path, capsys):
    jobs, elapsed = mjt.parse(LOG)
    assert [(j.rule, j.wildcards, j.seconds) for j in jobs] == [
        ("train", "run=embedded-s0", 316), ("accuracy", "run=embedded-s0, label=B12", 320),
        ("accuracy", "run=embedded-s0, label=B16", 2)]  # job 0 never finished: not counted
    assert elapsed == "0:05:33.1"
    assert mjt.per_rule(jobs) == [("accuracy", 2, 322), ("train", 1, 316)]
    log = tmp_path / "run.log"
    log.write_text(LOG)
    assert mjt.main([str(log), "--timeline"]) == 0
    out = capsys.readouterr().out
    assert "| accuracy | 2 | 322 |" in out and "3 jobs, 638 job-seconds; elapsed 0:05:33.1" in out
    assert "| accuracy | run=embedded-s0, label=B12 | 15:29:40 | 15:35:00 | 320 |" in out
    assert "label=B16" not in out.split("| rule | wildcards |")[1]  # under 5 s: not in the timeline


def test_not_a_log_is_one_line(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello\n")
    assert mjt.main([str(tmp_path / "x.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'x.txt'} has no finished Snakemake jobs (is it a Snakemake log?)"
    assert mjt.main([str(tmp_path / "missing.log")]) == 2
    assert "cannot read" in capsys.readouterr().err
