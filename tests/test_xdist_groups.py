"""The suite's xdist groups hold: under `-n 2 --dist loadgroup` every user of the shared tiny run lands on one worker
(so the run is made once, not once per worker), and the tests of one file share a worker (module fixtures: vLLM
engines, trained models). Two ways this silently broke before (each worker then made its own tiny workflow run and
CI run, ~10 CPU-minutes of the suite): tests/conftest.py's hook ran after pytest-xdist's, which had already read the
(missing) groups, and pytest 9.2 keeps node ids where pytest-xdist 3.8 cannot add a group (pyproject pins < 9.2).

Runs tests/conftest.py's own hook on a small synthetic suite whose `tiny_run` fixture only sleeps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = f'''
import importlib.util, sys, time
import pytest
sys.path.insert(0, {str(TESTS)!r})  # tests/helpers.py, which the real conftest imports
_spec = importlib.util.spec_from_file_location("repo_conftest", {str(TESTS / "conftest.py")!r})
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
pytest_collection_modifyitems = _real.pytest_collection_modifyitems  # the hook under test, tryfirst and all


@pytest.fixture(scope="session")
def tiny_run():
    time.sleep(0.05)
'''


def test_groups_reach_one_worker_each(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    users = "".join(f"def test_user_{i}(tiny_run):\n    time.sleep(0.05)\n\n\n" for i in range(6))
    (tmp_path / "test_one.py").write_text("import time\n\n\n" + users)
    (tmp_path / "test_two.py").write_text("import time\n\n\n" + users)
    (tmp_path / "test_three.py").write_text("import time\n\n\n" + "".join(
        f"def test_plain_{i}():\n    time.sleep(0.05)\n\n\n" for i in range(8)))
    res = subprocess.run([os.path.abspath(sys.executable), "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
                          "-p", "no:randomly", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = re.findall(r"^\[(gw\d)\].*PASSED (\S+)", res.stdout, re.MULTILINE)
    assert len(ran) == 20, res.stdout[-3000:]
    by_group: dict[str, set] = {}
    for worker, nodeid in ran:
        assert "@" in nodeid, f"no xdist group on {nodeid}: --dist loadgroup ignores the suite's groups"
        by_group.setdefault(nodeid.rsplit("@", 1)[1], set()).add(worker)
    assert set(by_group) == {"tiny_run", "test_three.py"}, by_group
    assert all(len(workers) == 1 for workers in by_group.values()), by_group


def test_longest_groups_are_collected_first(tmp_path):
    """Groups that run workflow jobs come first, then slow ones, then the rest, each group kept together and in its
    own order (with --no-loadscope-reorder, xdist hands the groups out in this order: long ones are not left to the
    end, where one worker would run them while the other idles)."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_a.py").write_text("def test_a1():\n    pass\n\n\ndef test_a2(tiny_run):\n    pass\n")
    (tmp_path / "test_b.py").write_text("import pytest\n\n\ndef test_b1():\n    pass\n\n\n"
                                        "@pytest.mark.slow\ndef test_b2():\n    pass\n")
    (tmp_path / "test_c.py").write_text("import pytest\n\n\ndef test_c1():\n    pass\n\n\n"
                                        "@pytest.mark.workflow\ndef test_c2():\n    pass\n")
    res = subprocess.run([os.path.abspath(sys.executable), "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
                          "-p", "no:cacheprovider", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    order = [line.split("::")[1] for line in res.stdout.splitlines() if "::" in line]
    assert order == ["test_a2", "test_c1", "test_c2", "test_b1", "test_b2", "test_a1"], order
