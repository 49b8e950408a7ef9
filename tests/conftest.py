"""Session-scoped fixtures shared across test files.

`tiny_run`: ONE finished run of the tiny workflow (helpers.TINY), made once per session and shared by the workflow
and report tests. It is read-only for its users: a test that changes a run works on a copy (`shutil.copytree`), and
dry runs (`snakemake -n`) write no outputs. `tiny_report`: the same run plus `snakemake --report` (adds only
results/report.html).

Every test that uses either is marked `workflow` and `slow` here (pytest_collection_modifyitems), so that
`-m "not workflow"` leaves them out without building the run.
"""

import json
import os

# OpenMP threads that wait sleep instead of spinning (read when torch loads libgomp, so before `import torch`; test
# subprocesses inherit it). With pytest-xdist's workers on every core, a 2-thread torch op otherwise spins against
# the other worker: 5 training steps on 2 threads took 31.5 s with the default policy and 5.6 s with PASSIVE on 2
# loaded cores (1 thread: 5.7 s). Results do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TINY, snakemake


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use tiny models: one intra-op thread is faster, and much faster when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny workflow run to completion (the README's `snakemake --cores 2` on helpers.TINY): its directory."""
    work = tmp_path_factory.mktemp("tiny-run")
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(TINY)
    res = snakemake(work, "--cores", "2", "--quiet")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def tiny_report(tiny_run):
    """`snakemake --report` on the shared tiny run: (run directory, report HTML, the report's `results` object)."""
    res = snakemake(tiny_run, "--report", "results/report.html")  # no --cores: the README's command as written
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = (tiny_run / "results" / "report.html").read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("var results = {"))
    results = json.loads(line.strip().removeprefix("var results = ").rstrip(";"))
    return tiny_run, text, results


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Markers, and the xdist groups that `-n auto --dist loadgroup` (pyproject addopts) sends to one worker each: all
    users of the shared tiny run (so it is made once), and otherwise one group per test file (so a module-scoped
    fixture, e.g. a vLLM engine or a trained model, is made once). `tryfirst`: pytest-xdist reads the groups in its
    own hook of this name, which otherwise runs first and sees none (tests/test_xdist_groups.py)."""
    groups = {}
    for item in items:
        if {"tiny_run", "tiny_report"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.workflow)
            item.add_marker(pytest.mark.slow)
            group = "tiny_run"
        else:
            group = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
        groups.setdefault(group, []).append(item)
    # Longest groups first (pyproject's --no-loadscope-reorder keeps this order; xdist's own puts the groups with
    # the most tests first, which sent the 90-s vLLM workflow run to the end of the vLLM suite): a worker takes the
    # next group when it runs dry, so long ones started last leave the other worker idle at the end.
    items[:] = [item for _, group in sorted(groups.items(), key=lambda g: _cost_rank(g[1])) for item in group]


def _cost_rank(group: list) -> int:
    """0: runs workflow jobs for real (a workflow run is the longest thing a test does), 1: slow, 2: the rest."""
    marks = {m.name for item in group for m in item.iter_markers()}
    return 0 if "workflow" in marks else 1 if "slow" in marks else 2
