"""The documentation site builds in strict mode, and the README, the CLI reference and the configuration reference stay
in step with the code (docs/about.md lists what is checked)."""

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_BYTES = 12 * 1024


def _refgen():
    spec = importlib.util.spec_from_file_location("refgen", ROOT / "docs" / "gen" / "refgen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # MkDocs-ecosystem notices about MkDocs 2 / ProperDocs / Zensical (docs/about.md), printed on every build
    return os.environ | {"PYTHONPATH": path, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.M), log[-5000:]
    return out


def test_site_builds_strict_with_every_generated_page(site):
    refgen = _refgen()
    for page in ("index.html", "getting-started/index.html", "reference/cli/index.html",
                 "reference/configuration/index.html", "results/history/index.html"):
        assert (site / page).is_file(), page
    for mod in refgen.api_modules():  # one API page per module on disk, rendered by mkdocstrings
        page = site / "reference" / "api" / Path(*mod.split(".")) / "index.html"
        assert page.is_file(), mod
        assert 'class="doc doc-contents' in page.read_text() or "doc-object" in page.read_text(), mod
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert all(f"alloc-moe {name}" in cli for name in refgen.cli_commands())
    for src in refgen.result_files():
        rel = src.relative_to(ROOT / "results").with_suffix("")
        rel = rel.parent if rel.name == "README" else rel
        assert (site / "results" / "files" / rel / "index.html").is_file(), src


def test_cli_reference_lists_every_subcommand_and_option():
    refgen = _refgen()
    md = refgen.cli_markdown()
    commands = refgen.cli_commands()
    assert len(commands) >= 10
    for name, parser in commands.items():
        assert f"## `alloc-moe {name}`" in md, name
        section = md.split(f"## `alloc-moe {name}`", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            for opt in action.option_strings or [action.metavar or action.dest]:
                assert f"`{opt}" in section, (name, opt)


def _schema_paths(node: dict, prefix: str = "") -> list[str]:
    """Every key of the schema, walked independently of docs/gen/refgen.py."""
    out = []
    for key, child in (node.get("properties") or {}).items():
        out.append(prefix + key)
        out += _schema_paths(child, f"{prefix}{key}.")
        if isinstance(child.get("items"), dict):
            out += _schema_paths(child["items"], f"{prefix}{key}[].")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):
        out.append(prefix + "<name>")
        out += _schema_paths(extra, f"{prefix}<name>.")
    return out


def test_config_reference_documents_every_schema_key():
    refgen = _refgen()
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    paths = _schema_paths(schema)
    assert {"models", "models.<name>.budgets", "methods[].layer", "latency.methods[].token"} <= set(paths)
    md = refgen.config_markdown()
    missing = [p for p in paths if f"`{p}` {{ #" not in md]
    assert not missing, f"keys missing from the configuration reference: {missing}"
    assert refgen.undocumented_config_keys() == [], "describe these keys in the schema or docs/gen/config_descriptions.yaml"


def _readme_sections() -> dict[str, str]:
    text = README.read_text()
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"<!-- --8<-- \[start:([\w-]+)\] -->\n(.*?)<!-- --8<-- \[end:\1\] -->", text, re.S)}


def test_readme_is_a_front_page_and_the_docs_include_its_commands():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"
    text = README.read_text()
    setup = re.search(r"^## Set-up.*?\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    commands = [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", setup, re.S | re.M)]
    sections = _readme_sections()
    assert sections["main-job"] == f"```bash\n{commands[0]}\n```"
    assert sections["test-command"] == f"```bash\n{commands[1]}\n```"
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    assert '--8<-- "README.md:main-job"' in guide and '--8<-- "README.md:test-command"' in guide
    # the extras the two commands install exist, and the docs extra is part of dev
    extras = re.findall(r'-e "\.\[([\w,-]+)\]"', " ".join(commands))
    assert extras == ["dev", "dev", "test,workflow,vllm-cpu"], extras
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in {e for group in extras for e in group.split(",")} | {"docs"}:
        assert re.search(rf"^{re.escape(extra)} = \[", pyproject, re.M), extra
    assert re.search(r'^dev = \["alloc-moe\[[\w,]*\bdocs\b', pyproject, re.M)
    assert "mkdocs serve" in text


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def _documented_command_lines() -> list[tuple[str, str]]:
    """Every `alloc-moe ...` line in a bash block of the README and the hand-written docs pages."""
    files = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    out = []
    for path in files:
        for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), re.S | re.M):
            for line in block.splitlines():
                line = line.split("  #", 1)[0].strip()
                if line.startswith("alloc-moe "):
                    out.append((path.relative_to(ROOT).as_posix(), line))
    return out


def test_documented_command_lines_parse_with_the_real_parser():
    from alloc_moe.cli import build_parser

    lines = _documented_command_lines()
    assert len(lines) >= 25
    parser = build_parser()
    for where, line in lines:
        line = re.sub(r"\$\{?\w+\}?", "X", line.split(" > ", 1)[0])  # shell variables, output redirection
        args = shlex.split(line)[1:]
        try:
            parser.parse_args(args)
        except SystemExit as e:
            pytest.fail(f"{where}: `{line}` does not parse (exit {e.code})")
