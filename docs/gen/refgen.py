"""Reference pages generated from the code at build time (called by `docs/gen/gen_pages.py` under mkdocs-gen-files,
and by tests/docs/test_docs.py): the CLI reference from `alloc_moe.cli.build_parser()`, the configuration reference from
`workflow/schemas/config.schema.yaml`, and one API page per module found on disk under `alloc_moe/`.

Nothing here lists a module, a subcommand or a config key by hand: a new one appears on the next build. A config key
with no description (neither in the schema nor in `docs/gen/config_descriptions.yaml`) is reported by
`undocumented_config_keys()`, which the build logs as a warning: `mkdocs build --strict` then fails.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "alloc_moe"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
CONFIG_DESCRIPTIONS = Path(__file__).with_name("config_descriptions.yaml")


# ---- CLI ------------------------------------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> tuple[argparse._SubParsersAction, dict[str, str]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {ca.dest: ca.help or "" for ca in action._choices_actions}
    return action, helps


def cli_commands() -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> its parser, in the order `alloc-moe --help` lists them."""
    from alloc_moe.cli import build_parser

    action, _ = _subparsers(build_parser())
    return dict(action.choices)


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _option_row(action: argparse.Action) -> str | None:
    if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
        return None
    if action.option_strings:
        names = ", ".join(f"`{s}`" for s in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or (action.dest.upper() if not action.choices else None)
            if metavar:
                names += f" `{metavar if isinstance(metavar, str) else ' '.join(metavar)}`"
    else:
        names = f"`{action.metavar or action.dest}` (positional)"
    details = []
    if action.choices:
        details.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.required and action.option_strings:
        details.append("**required**")
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        details.append("repeatable" if isinstance(action, argparse._AppendAction) else f"nargs `{action.nargs}`")
    if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
        details.append(f"default `{action.default}`")
    help_text = (action.help or "") % {"default": action.default, "prog": "", "dest": action.dest} \
        if action.help and "%(" in action.help else (action.help or "")
    return f"| {names} | {_md_cell(help_text)} | {_md_cell('; '.join(details))} |"


def cli_markdown() -> str:
    from alloc_moe.cli import build_parser

    parser = build_parser()
    action, helps = _subparsers(parser)
    out = [
        "# CLI reference",
        "",
        "Generated at build time from `alloc_moe.cli.build_parser()` (every subcommand, its help and its options),",
        "so it cannot drift from the code. `alloc-moe COMMAND --help` prints the same in a terminal. The",
        "[getting-started guide](../getting-started.md) shows the commands in use.",
        "",
        "Errors: bad input exits with code 2 and one line saying what is wrong and what is allowed; outputs are",
        "written atomically, so a failed command leaves no partial file.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name in action.choices:
        out.append(f"| [`{name}`](#{name}) | {_md_cell(helps.get(name, ''))} |")
    out.append("")
    for name, sub in action.choices.items():
        out += [f"## `alloc-moe {name}` {{ #{name} }}", ""]
        text = (sub.description or "").strip() or _md_cell(helps.get(name, "")) + "."
        out += [text[0].upper() + text[1:], ""]
        usage = sub.format_usage().strip()
        out += ["```text", usage.removeprefix("usage: "), "```", ""]
        rows = [r for r in (_option_row(a) for a in sub._actions) if r]
        if rows:
            out += ["| option | help | details |", "|---|---|---|", *rows, ""]
        groups = [g for g in sub._mutually_exclusive_groups]
        for g in groups:
            names = ", ".join(f"`{a.option_strings[0]}`" for a in g._group_actions if a.option_strings)
            out += [f"Mutually exclusive{' (one is required)' if g.required else ''}: {names}.", ""]
        if sub.epilog:
            out += [sub.epilog.strip(), ""]
    return "\n".join(out)


# ---- configuration --------------------------------------------------------------------------------------------------
def _type_of(node: dict) -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    t = node.get("type")
    if isinstance(t, list):
        t = " or ".join(t)
    if t == "array":
        items = node.get("items", {})
        inner = "objects" if items.get("type") == "object" else _type_of(items) if items else "values"
        return f"list of {inner}"
    if t == "object" and "additionalProperties" in node and isinstance(node["additionalProperties"], dict) \
            and "properties" not in node:
        return "mapping"
    return t or ""


def _constraints(node: dict) -> str:
    parts = []
    for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
                      ("minItems", "items >="), ("minProperties", "entries >="), ("minLength", "length >=")):
        if key in node:
            parts.append(f"{word} {node[key]}")
    if node.get("uniqueItems"):
        parts.append("unique")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    if "propertyNames" in node and "pattern" in node["propertyNames"]:
        parts.append(f"names match `{node['propertyNames']['pattern']}`")
    if node.get("required") and node.get("type") == "object":
        parts.append("requires " + ", ".join(f"`{r}`" for r in node["required"]))
    for key in ("oneOf", "anyOf"):
        if key in node:
            alts = [" + ".join(f"`{r}`" for r in alt.get("required", [])) for alt in node[key]]
            parts.append("exactly one of " + ", ".join(a for a in alts if a))
    return "; ".join(parts)


def schema_keys(schema: dict | None = None) -> list[tuple[str, dict, bool]]:
    """Every key the schema allows, depth first in schema order: (dotted path, schema node, required).

    `<name>` stands for a free-form mapping key (e.g. `models.<name>`), `[]` for a list's items."""
    schema = schema if schema is not None else yaml.safe_load(SCHEMA.read_text())
    out: list[tuple[str, dict, bool]] = []

    def walk(node: dict, prefix: str) -> None:
        required = set(node.get("required", []))
        for key, child in (node.get("properties") or {}).items():
            path = f"{prefix}{key}"
            out.append((path, child, key in required))
            visit(child, path)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and (extra.get("properties") or extra.get("additionalProperties")):
            path = f"{prefix}<name>"
            out.append((path, extra, False))
            visit(extra, path)

    def visit(child: dict, path: str) -> None:
        if child.get("properties") or isinstance(child.get("additionalProperties"), dict):
            walk(child, path + ".")
        items = child.get("items")
        if isinstance(items, dict) and items.get("properties"):
            walk(items, path + "[].")

    walk(schema, "")
    return out


def config_descriptions() -> dict[str, str]:
    data = yaml.safe_load(CONFIG_DESCRIPTIONS.read_text()) or {}
    return {str(k): " ".join(str(v).split()) for k, v in data.items()}


def undocumented_config_keys() -> list[str]:
    """Schema keys with neither a schema `description` nor an entry in config_descriptions.yaml."""
    notes = config_descriptions()
    return [path for path, node, _ in schema_keys() if not node.get("description") and path not in notes]


def stale_config_descriptions() -> list[str]:
    """Entries of config_descriptions.yaml for keys the schema does not have (not an error: they may describe keys
    another branch is adding; the build lists them)."""
    keys = {path for path, _, _ in schema_keys()}
    return sorted(set(config_descriptions()) - keys)


def _anchor(path: str) -> str:
    return "cfg-" + "".join(c if c.isalnum() else "-" for c in path).strip("-").lower()


def config_markdown() -> str:
    schema = yaml.safe_load(SCHEMA.read_text())
    notes = config_descriptions()
    keys = schema_keys(schema)
    out = [
        "# Configuration reference",
        "",
        "Generated at build time from `workflow/schemas/config.schema.yaml`, the schema the workflow validates every",
        "config against (a bad config stops before any job with one line: `config error: <where>: <what> (allowed:",
        "...)`, exit code 2). Every key the schema allows is listed; a key without a description fails the strict",
        "documentation build. Descriptions come from the schema's `description`, extended by",
        "`docs/gen/config_descriptions.yaml` where the schema says nothing or too little.",
        "",
        "Files: `config/config.yaml` is the embedded default; `config/fidelity.yaml` (seven seeds), `config/ci.yaml`",
        "(the CI reference), `config/vllm.yaml` (the default through vLLM), `config/smoke.yaml` and",
        "`config/paper.yaml` (real checkpoints on a GPU) are merged over it with `--configfile`, as Snakemake merges",
        "config files; a model set to `null` is left out. Single keys: `--config key=value`. See",
        "[the workflow](../guides/workflow.md) for what each stage reads.",
        "",
        "`<name>` is a key you choose (a model's name); `[]` is an item of a list.",
        "",
        "## Top-level keys",
        "",
        "| key | type | default | what it is |",
        "|---|---|---|---|",
    ]
    for path, node, required in keys:
        if "." not in path and "[" not in path:
            desc = _first_clause(node.get("description") or notes.get(path, ""))
            out.append(f"| [`{path}`](#{_anchor(path)}) | {_md_cell(_type_of(node))} | "
                       f"{_md_cell(_default(node))} | {'**required**; ' if required else ''}{_md_cell(desc)} |")
    out.append("")
    for path, node, required in keys:
        depth = path.count(".") + path.count("[]")
        level = "##" if depth == 0 else "###"
        out += [f"{level} `{path}` {{ #{_anchor(path)} }}", ""]
        facts = [f"**Type:** {_type_of(node)}" if _type_of(node) else ""]
        if "default" in node:
            facts.append(f"**Default:** {_default(node)}")
        if required:
            facts.append("**Required**")
        c = _constraints(node)
        if c:
            facts.append(f"**Constraints:** {c}")
        out += [" · ".join(f for f in facts if f), ""]
        desc = node.get("description")
        if desc:
            out += [" ".join(desc.split()), ""]
        if path in notes:
            out += [notes[path], ""]
    return "\n".join(out)


def _first_clause(text: str) -> str:
    """The first sentence or clause of a description, for the summary table: cut at the first ". " or "; " outside
    parentheses (not after "Fig." or "e.g.")."""
    text = " ".join(text.split())
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if depth == 0 and text[i:i + 2] in (". ", "; ") and not re.search(r"(Figs?|e\.g|i\.e)$", text[:i]):
            return text[:i]
    return text


def _default(node: dict) -> str:
    if "default" not in node:
        return ""
    return f"`{json.dumps(node['default'])}`"


# ---- API ------------------------------------------------------------------------------------------------------------
def api_modules() -> list[str]:
    """Every module of the package on disk (packages as their `__init__`), sorted, `__main__` left out."""
    pkg = ROOT / PACKAGE
    mods = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__" or any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


# ---- committed result files -------------------------------------------------------------------------------------------
RESULT_FILES = ("README.md", "benchmarks/**/*.md", "vllm-cpu/**/*.md", "gpu/**/*.md")


def result_files() -> list[Path]:
    """The committed Markdown under results/ (the git-ignored rest of results/ is a local run's output)."""
    base = ROOT / "results"
    return sorted({p for pattern in RESULT_FILES for p in base.glob(pattern) if p.is_file()})


def result_file_markdown(path: Path) -> str:
    """A committed result file as a page: its own text, under a title if it has none, with where it lives."""
    text = path.read_text()
    rel = path.relative_to(ROOT).as_posix()
    note = f"*Committed file `{rel}`, shown as it is in the repository.*\n\n"
    if text.startswith("# "):
        title, _, rest = text.partition("\n")
        return f"{title}\n\n{note}{rest.lstrip()}"
    return f"# `{rel}`\n\n{note}{text}"
