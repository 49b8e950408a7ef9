"""Per-module code hashes: closures found with ast, checked against what Python really imports."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alloc_moe import AllocMoeError
from alloc_moe.harness.codehash import (
    PACKAGE_DIR,
    closure_files,
    code_hash,
    module_closure,
)

ROOT = PACKAGE_DIR.parent


def test_plotting_closure_excludes_the_hf_backend_and_vice_versa():
    plots = module_closure(["alloc_moe.report.plots"])
    backend = module_closure(["alloc_moe.backends.hf.apply"])
    assert "alloc_moe.report.plots" in plots and "alloc_moe.io" in plots
    assert "alloc_moe.backends.hf.apply" not in plots and "alloc_moe.data.zoo" not in plots
    assert "alloc_moe.backends.hf.apply" in backend and "alloc_moe.backends.hf.stats" in backend
    assert "alloc_moe.report.plots" not in backend
    # function-level imports count: evaluation uses the backend only inside its functions
    assert "alloc_moe.backends.hf.apply" in module_closure(["alloc_moe.stages.ppl"])


@pytest.mark.parametrize("entry", ["alloc_moe.report.plots", "alloc_moe.backends.hf.apply", "alloc_moe.harness.regress", "alloc_moe.report.summary"])
def test_closure_contains_every_module_python_imports(entry):
    """Independent reference: the modules a fresh interpreter has loaded after `import entry`."""
    code = f"import sys, json, {entry}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'alloc_moe')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    imported = set(json.loads(out.stdout))
    assert imported <= set(module_closure([entry]))


@pytest.fixture
def pkg(tmp_path):
    """A copy of the real package to edit."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "alloc_moe", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "alloc_moe"


def test_editing_outside_the_closure_keeps_the_hash_inside_changes_it(pkg):
    before = code_hash(["alloc_moe.report.plots"], pkg)
    assert before == code_hash(["alloc_moe.report.plots"], PACKAGE_DIR)  # the location does not enter the hash
    with open(pkg / "backends/hf/apply.py", "a") as f:
        f.write("\n# an edit of the HF backend\n")
    assert code_hash(["alloc_moe.report.plots"], pkg) == before
    backend_before = code_hash(["alloc_moe.backends.hf.apply"], PACKAGE_DIR)
    assert code_hash(["alloc_moe.backends.hf.apply"], pkg) != backend_before
    with open(pkg / "report/plots.py", "a") as f:
        f.write("\n# an edit of the plotting code\n")
    assert code_hash(["alloc_moe.report.plots"], pkg) != before
    assert code_hash(["alloc_moe.backends.hf.apply"], pkg) == code_hash(["alloc_moe.backends.hf.apply"], pkg)


def test_package_data_named_by_a_module_is_hashed(pkg):
    assert pkg / "schemas" / "plan.schema.json" in closure_files(["alloc_moe.core.plan"], pkg)
    before = code_hash(["alloc_moe.core.plan"], pkg)
    schema = pkg / "schemas" / "plan.schema.json"
    schema.write_text(schema.read_text() + " ")
    assert code_hash(["alloc_moe.core.plan"], pkg) != before


def _make(tmp_path, files: dict[str, str]) -> Path:
    root = tmp_path / "alloc_moe"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_import_forms_on_a_synthetic_package(tmp_path):
    root = _make(tmp_path, {
        "__init__.py": """
            from .base import VERSION
            def apply():
                from .heavy import run      # lazy: only code that calls apply() needs heavy
        """,
        "base.py": "import io\nVERSION = 1\n",           # the standard library's io, not alloc_moe.io
        "io.py": "",
        "heavy.py": "",
        "tool.py": """
            from . import __version__ as v, sub
            from alloc_moe.helpers import used
            def main():
                from .lazy import thing
        """,
        "sub/__init__.py": "from ..util import x\n",
        "util.py": "x = 1\n",
        "helpers.py": """
            REGISTRY = {"a": registered}
            def used():
                return _inner()
            def _inner():
                from .inner_dep import y
            def unused():
                from .never import z
            def registered():
                from .via_registry import w
        """,
        "lazy.py": "", "inner_dep.py": "", "never.py": "", "via_registry.py": "",
    })
    closure = {m.removeprefix("alloc_moe.").removeprefix("alloc_moe") or "<init>" for m in module_closure(["alloc_moe.tool"], root)}
    assert closure == {"<init>", "base", "tool", "sub", "util", "helpers", "lazy", "inner_dep", "via_registry"}
    # `from alloc_moe import apply` uses apply, and apply's lazy import
    root_user = root / "user.py"
    root_user.write_text("from alloc_moe import apply\n")
    assert "alloc_moe.heavy" in module_closure(["alloc_moe.user"], root)
    assert "alloc_moe.heavy" in module_closure(["alloc_moe"], root)  # the package as an entry: all of it


def test_workflow_script_as_entry():
    script = ROOT / "workflow/scripts/summarize.py"
    closure = module_closure([str(script)])
    assert {"alloc_moe.report.summary", "alloc_moe.harness.provenance", "alloc_moe.io"} <= set(closure)
    assert "alloc_moe.backends.hf.apply" not in closure
    assert script in closure_files([str(script)])


@pytest.mark.parametrize("entry", ["alloc_moe.nope", "plots", "missing_script.py"])
def test_unknown_entry_is_an_error(entry):
    with pytest.raises(AllocMoeError):
        code_hash([entry])


def test_hash_is_16_hex_and_order_independent():
    h = code_hash(["alloc_moe.report.plots", "alloc_moe.report.summary"])
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == code_hash(["alloc_moe.report.summary", "alloc_moe.report.plots"])
