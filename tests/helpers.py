"""Helpers shared by several test files, imported explicitly (`from helpers import ...`; tests/ is on sys.path as
pytest's rootdir-relative test directory). Fixtures live in conftest.py; this module holds plain functions and
constants so that no test module imports another."""

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# The tiny workflow config (a file, as the test configs of the Snakemake catalog are): one run of it (conftest's
# session fixture `tiny_run`) is shared by the workflow and report tests.
TINY = (ROOT / ".test/config/tiny.yaml").read_text()


def require_snakemake():
    if not SNAKEMAKE.exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")


def snakemake(workdir: Path, *args: str, snakefile: Path | None = None, timeout: int = 600,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """The repository's Snakefile (or `snakefile`) run in `workdir`, output captured; skips without snakemake."""
    require_snakemake()
    return subprocess.run([str(SNAKEMAKE), "--snakefile", str(snakefile or ROOT / "Snakefile"), "--directory",
                           str(workdir), *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def snakemake_over_default(workdir: Path, configfiles: list, *args: str, **env: str) -> subprocess.CompletedProcess:
    """snakemake with the config files merged over the embedded default (offline; a dry run unless `args`)."""
    require_snakemake()
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "config/config.yaml", workdir / "config/config.yaml")
    return snakemake(workdir, "--configfile", *map(str, configfiles), *(args or ["-n"]), env={**OFFLINE, **env})


def dry_run_jobs(log: str) -> tuple[Counter, dict[str, list[str]]]:
    """(rule -> jobs, rule -> outputs) of a dry run's job listing."""
    counts, outputs, rule = Counter(), {}, None
    for line in log.splitlines():
        if m := re.match(r"^(?:local)?rule (\S+):$", line):
            rule = m.group(1)
            counts[rule] += 1
        elif (m := re.match(r"^\s+output: (.*)$", line)) and rule:
            outputs.setdefault(rule, []).extend(m.group(1).split(", "))
    return counts, outputs


# ---- static graphs: no data-dependent host sync (token allocation, the GPU check's stand-ins, vLLM routing) ----

# aten ops whose output shape or value must be read on the host (boolean indexing lowers to index.Tensor / nonzero)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "index",
            "index_put", "masked_scatter", "repeat_interleave"}


def graph_ops(fn, *args):
    """The aten call_function targets of `fn` traced with fake tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    g = make_fx(fn, tracing_mode="fake")(*args)
    return [str(n.target) for n in g.graph.nodes if n.op == "call_function"]


def sync_ops(ops):
    return [o for o in ops if o.startswith("aten.") and o.split(".")[1] in SYNC_OPS]
