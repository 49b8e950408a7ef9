"""workflow/rules/scheduler.smk: a local run has no job-rate limiter, so Snakemake's scheduler arms no 1-s timers.

Snakemake 9 re-runs a scheduling pass 1 s after every pass that leaves jobs waiting, through a `threading.Timer`,
whenever a job rate limit is set (the CLI's default is 100/1s); each pass arms the next. The test counts the Timers a
real `snakemake --cores 1` creates on a four-job workflow (three jobs wait while one runs): none with the Snakefile
including scheduler.smk, some without it (which shows the count sees them).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# snakemake's CLI in this interpreter with threading.Timer counted; the count is written at exit
COUNTING_CLI = textwrap.dedent("""
    import atexit, sys, threading
    made = []
    class Counted(threading.Timer):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)
    threading.Timer = Counted
    out, sys.argv = sys.argv[1], ["snakemake", *sys.argv[2:]]
    atexit.register(lambda: open(out, "w").write(str(len(made))))
    from snakemake.cli import main
    main()
""")


def _timers(tmp_path: Path, include: bool) -> int:
    work = tmp_path / ("with" if include else "without")
    work.mkdir()
    head = f'include: "{ROOT / "workflow/rules/scheduler.smk"}"\n' if include else ""
    (work / "Snakefile").write_text(head + textwrap.dedent("""
        rule all:
            input: expand("w/{i}", i=range(4))
        rule wait:
            output: "w/{i}"
            shell: "sleep 0.3; touch {output}"
    """))
    count = work / "timers.txt"
    res = subprocess.run([sys.executable, "-c", COUNTING_CLI, str(count), "--cores", "1", "--quiet", "all",
                          "--directory", str(work), "--snakefile", str(work / "Snakefile")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert all((work / "w" / str(i)).exists() for i in range(4))
    return int(count.read_text())


def test_local_runs_arm_no_scheduler_timers(tmp_path):
    if subprocess.run([sys.executable, "-c", "import snakemake"], capture_output=True).returncode:
        pytest.skip("needs snakemake: pip install -e '.[workflow]'")
    assert _timers(tmp_path, include=False) > 0  # Snakemake's default: a timer chain while jobs wait
    assert _timers(tmp_path, include=True) == 0
