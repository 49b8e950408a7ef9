"""A real SLURM run (issue 17): CI's reduced default (config/ci.yaml, a plain --configfile) through
`snakemake --profile workflow/profiles/slurm` on a one-node cluster that .ci/slurm-cluster installs (Debian's slurm-wlm
and munge, if missing), configures for this machine, starts and stops. The jobs go through sbatch (ids in the log,
seen in squeue), a GPU request is scheduled on the node's fake GPU, and the summary tables pass `alloc-moe regress`
against results/reference/ci. Marker `cluster`: left out of a plain `pytest` (the README's test command), run by
.ci/run's cluster stage (`pytest -m cluster`). Skipped, with the script's reason, only where the packages cannot be
installed (not root, apt failing) or the machine has a SLURM configuration of its own; in CI (CI=1) that fails.

Cost: one cluster start (seconds) and one run of the reduced default, about 3x a local run (each job starts its own
Snakemake; docs/guides/clusters-containers.md has the measurements)."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from alloc_moe.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.workflow, pytest.mark.cluster]  # run by .ci/run's cluster stage

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SCRIPT = ROOT / ".ci/slurm-cluster"
PROFILE = ROOT / "workflow/profiles/slurm"
REFERENCE = ROOT / "results/reference/ci"
TOLERANCE = ROOT / "config/ci-tolerance.yaml"
TARGET = "results/summary/manifest.json"
GPU_RULE = "profile_lexi"  # asks for the fake GPU here (gpu=1): the path a real checkpoint's jobs take


def _unavailable(reason: str):
    """Skip where SLURM cannot be had; in CI's cluster stage (CI=1) that is a failure: the stage exists to run these."""
    (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not SNAKEMAKE.exists() or shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        _unavailable("needs snakemake and SLURM (or root with apt-get to install it)")
    where = tmp_path_factory.mktemp("slurm")
    try:
        res = subprocess.run([str(SCRIPT), "start", str(where)], capture_output=True, text=True, timeout=600)
        if res.returncode in (3, 4):  # cannot install / a site configuration is in place: nothing was started
            _unavailable(res.stderr.strip())
        assert res.returncode == 0, res.stderr[-3000:]
        yield where
    finally:  # also after a failed or interrupted start (the script stops what it started; this is idempotent)
        subprocess.run([str(SCRIPT), "stop", str(where)], capture_output=True, text=True, timeout=120)


def _squeue() -> dict[str, tuple[str, str]]:
    """job id -> (state, comment: the rule or group) of every job the controller still knows."""
    out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"], capture_output=True, text=True).stdout
    return {i: (state, comment) for i, state, comment in (line.split("|", 2) for line in out.splitlines())}


class _Poller(threading.Thread):
    """squeue once a second while the run lasts: what a user watching the queue sees."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: dict[str, set[str]] = {}
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(1.0):
            for i, (state, _) in _squeue().items():
                self.seen.setdefault(i, set()).add(state)


def _profile_set_resources(*extra: str) -> list[str]:
    """The profile's set-resources as command-line values (a command-line --set-resources replaces the profile's)."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    return [f"{rule}:{k}={v}" for rule, res in profile["set-resources"].items() for k, v in res.items()] + list(extra)


def test_ci_config_through_slurm_matches_the_reference(cluster, tmp_path, capsys):
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    shutil.copy(ROOT / "config/config.yaml", work / "config/config.yaml")  # a checkout: ci.yaml is merged over it
    cmd = [str(SNAKEMAKE), TARGET, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
           "--profile", str(PROFILE), "--configfile", str(ROOT / "config/ci.yaml"),
           # the reference was trained on 1 thread (training is deterministic per thread count); --cores 1 also
           # makes a group job ask for 1 CPU, not the whole node (2 CPUs here): two SLURM jobs run side by side
           "--set-threads", "train=1", "latency=1", "--cores", "1",
           "--set-resources", *_profile_set_resources(f"{GPU_RULE}:gpu=1")]
    poller = _Poller()
    poller.start()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    finally:
        poller.done.set()
        poller.join()
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]

    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    assert len(submitted) >= 8, log[-3000:]  # 21 jobs, grouped into about 11 SLURM jobs
    final = _squeue()  # MinJobAge=3600: the run's jobs are all still listed
    assert {i: final[i][0] for i in submitted} == {i: "COMPLETED" for i in submitted}
    assert any("RUNNING" in poller.seen.get(i, ()) for i in submitted), poller.seen  # live in the queue
    comments = {final[i][1] for i in submitted}
    assert any(c.startswith("rule_train") for c in comments) and any("plan" in c for c in comments), comments
    gpu_job = next(i for i in submitted if final[i][1].startswith(f"rule_{GPU_RULE}"))
    job = subprocess.run(["scontrol", "show", "job", gpu_job], capture_output=True, text=True).stdout
    assert re.search(r"gres[/:]gpu[:=]1", job), job  # scheduled on the fake GPU

    code = main(["regress", "--baseline", str(REFERENCE), "--current", str(work / "results"), "--tolerance",
                 str(TOLERANCE), "--out", str(tmp_path / "report.csv")])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err


def test_a_failed_job_shows_slurms_reason(cluster, tmp_path):
    """Without accounting the status command (squeue) gives only a state; the profile's show-failed-logs prints the
    job's SLURM log, where slurmstepd says why SLURM ended it. A job cancelled while it runs (a time limit reads
    "... CANCELLED AT <time> DUE TO TIME LIMIT ***", measured by hand: it costs a minute more)."""
    (tmp_path / "Snakefile").write_text('rule stuck:\n    output: "never.txt"\n    shell: "sleep 300; touch {output}"\n')
    proc = subprocess.Popen([str(SNAKEMAKE), "--profile", str(PROFILE), "--retries", "0", "--directory", str(tmp_path),
                             "--snakefile", str(tmp_path / "Snakefile")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    running = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            running = [i for i, (state, comment) in _squeue().items() if state == "RUNNING" and "stuck" in comment]
            if running:
                subprocess.run(["scancel", *running], check=True)
                break
            time.sleep(1)
        log = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and running, log[-3000:]
    assert f"SLURM-job '{running[0]}' failed, SLURM status is: 'CANCELLED'" in log, log[-3000:]
    assert re.search(rf"slurmstepd\S*: error: \*\*\* JOB {running[0]} ON \S+ CANCELLED AT", log), log[-3000:]
