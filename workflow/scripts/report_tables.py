"""HTML views of the summary tables for `snakemake --report` (it shows HTML inline; .md, .csv and .json only as
downloads): each input becomes the output at the same position. Markdown tables render with markdown-it, CSVs in
full with their values as written, environment.json with the config hash and the resolved config."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import html
import json
import re
from pathlib import Path

import pandas as pd
from markdown_it import MarkdownIt

from alloc_moe.io import atomic_write_text

STYLE = """body { font-family: sans-serif; font-size: 13px; margin: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; white-space: nowrap; }
th { background: #eee; position: sticky; top: 0; }
pre { background: #f6f6f6; padding: 0.5em; }"""


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>\n{STYLE}\n</style></head>\n<body>\n{body}\n</body></html>\n")


def markdown(src: Path) -> str:
    return page(src.name, MarkdownIt("commonmark").enable("table").render(src.read_text()))


def table(df: pd.DataFrame) -> str:
    return re.sub(r">\s+<", "><", df.to_html(index=False, border=0))  # no indentation: tables can be big


def csv(src: Path) -> str:
    df = pd.read_csv(src, dtype=str, keep_default_na=False)  # the values exactly as the CSV writes them
    return page(src.name, f"<h3>{src.name}</h3><p>{len(df)} rows; columns: {', '.join(df.columns)}</p>\n{table(df)}")


def environment(src: Path) -> str:
    env = {"config_hash": snakemake.params.config_hash, **json.loads(src.read_text())}
    rows = pd.DataFrame({"key": list(env), "value": [str(v) for v in env.values()]})
    config = json.dumps(snakemake.config, indent=1, sort_keys=True)
    return page(src.name, f"<h3>Environment of the summary step</h3>\n{table(rows)}\n"
                f"<h3>Resolved config</h3>\n<pre>{html.escape(config)}</pre>")


RENDER = {".md": markdown, ".csv": csv, ".json": environment}
for src, dst in zip(map(Path, snakemake.input), snakemake.output, strict=True):
    atomic_write_text(dst, RENDER[src.suffix](src))
