"""mkdocs-gen-files script: writes the generated reference pages into the build (never into docs/ on disk).

- reference/cli.md            from alloc_moe.cli.build_parser()
- reference/configuration.md  from workflow/schemas/config.schema.yaml (+ docs/gen/config_descriptions.yaml)
- reference/api/**            one page per module found under alloc_moe/, rendered by mkdocstrings, with a
                              SUMMARY.md that mkdocs-literate-nav turns into the navigation
"""

import logging
import sys
from pathlib import Path

import mkdocs_gen_files

sys.path.insert(0, str(Path(__file__).parent))
import refgen  # noqa: E402

sys.path.insert(0, str(refgen.ROOT))  # the package from this checkout, installed or not

log = logging.getLogger("mkdocs.plugins.alloc_moe_docs")

with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(refgen.cli_markdown())

for key in refgen.undocumented_config_keys():
    log.warning("config key %r has no description: add one to workflow/schemas/config.schema.yaml or "
                "docs/gen/config_descriptions.yaml", key)
stale = refgen.stale_config_descriptions()
if stale:
    log.info("docs/gen/config_descriptions.yaml describes keys the schema does not have (yet): %s", ", ".join(stale))
with mkdocs_gen_files.open("reference/configuration.md", "w") as f:
    f.write(refgen.config_markdown())

nav = mkdocs_gen_files.Nav()
for mod in refgen.api_modules():
    parts = tuple(mod.split("."))
    is_package = (refgen.ROOT / Path(*parts) / "__init__.py").is_file()
    rel = Path(*parts, "index.md") if is_package else Path(*parts).with_suffix(".md")  # a package: its section's page
    doc = Path("reference", "api") / rel
    nav[parts] = rel.as_posix()
    with mkdocs_gen_files.open(doc, "w") as f:
        f.write(f"# `{mod}`\n\n::: {mod}\n")
with mkdocs_gen_files.open("reference/api/SUMMARY.md", "w") as f:
    f.writelines(nav.build_literate_nav())

# The committed Markdown under results/ (measurements with their commands and environments), as pages of their own so
# that the results pages can link to them. Only the committed folders: a local run's results/summary/ is not shown.
files_nav = mkdocs_gen_files.Nav()
for src in refgen.result_files():
    rel = src.relative_to(refgen.ROOT / "results")
    with mkdocs_gen_files.open(Path("results", "files", rel), "w") as f:
        f.write(refgen.result_file_markdown(src))
    files_nav[tuple(rel.with_suffix("").parts)] = rel.as_posix()
with mkdocs_gen_files.open("results/files/SUMMARY.md", "w") as f:
    f.writelines(files_nav.build_literate_nav())
