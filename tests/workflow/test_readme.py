"""The README's set-up section holds exactly two commands (main job, tests), and `.ci/run` runs the second one."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Set-up.*?\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    return [block.strip() for block in re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)]


def test_readme_has_exactly_two_one_line_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each set-up command is one line a newcomer copies"
    main, tests = cmds
    assert main.endswith("snakemake --cores 2")
    assert "-m pytest &&" in tests and tests.endswith("-m pytest -m vllm")
    assert "torch==2.13.0" in main and "torch==2.13.0" in tests  # else pip pulls a CUDA build


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"\$\((awk .*? README\.md)\)", script).group(1)
    out = subprocess.run(["bash", "-c", awk], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == _setup_commands()[1]
    assert "set -x; $cmd\"" in script
