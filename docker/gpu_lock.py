"""The GPU image's requirements and their lock (docker/gpu-constraints.txt).

    python3 docker/gpu_lock.py requirements   # the requirement list the image installs (from pyproject.toml)
    python3 docker/gpu_lock.py lock           # re-resolve it against PyPI and rewrite docker/gpu-constraints.txt

The lock is every distribution the image's venv holds, `name==version`, as `pip install --dry-run --ignore-installed
--report` resolved it for CPython 3.11 on linux x86_64 (the Debian bookworm base's Python; run it with such a Python).
Resolution uses PyPI only: the machine's pip configuration (local find-links, extra indexes, constraints) is
switched off, since a local `torch 2.13.0+cpu` wheel would otherwise satisfy `torch==2.13.0`.
The Dockerfile's gpu-build stage installs with PIP_CONSTRAINT=docker/gpu-constraints.txt; .ci/container-smoke
TARGET=gpu builds its wheelhouse with it and checks that the image's venv equals it.
"""

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "docker" / "gpu-constraints.txt"
# torch first (the CPU target does the same); setuptools and wheel: the project's build backend, from the wheelhouse
PINNED_FIRST = ["torch==2.13.0", "setuptools>=69", "wheel"]


def requirements() -> list[str]:
    p = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = p["optional-dependencies"]
    return [*PINNED_FIRST, *p["dependencies"], *extras["workflow"], *extras["vllm"]]


def clean_pip_env() -> dict[str, str]:
    """The environment for a PyPI-only pip: no configuration files, no find-links/extra-index/constraint variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> None:
    if (sys.version_info[:2], sys.platform, platform.machine()) != ((3, 11), "linux", "x86_64"):
        sys.exit(f"lock with CPython 3.11 on linux x86_64 (the image's), not {sys.version.split()[0]} "
                 f"{sys.platform} {platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        req, report = Path(tmp, "requirements.txt"), Path(tmp, "report.json")
        req.write_text("\n".join(requirements()) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "-r", str(req)], check=True, env=clean_pip_env())
        items = json.loads(report.read_text())["install"]
    pip_version = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    pins = sorted((canonical(i["metadata"]["name"]), i["metadata"]["version"]) for i in items)
    vllm = dict(pins)["vllm"]
    torch = dict(pins)["torch"]
    head = [
        f"# The GPU image's venv, pinned: {len(pins)} distributions (vllm {vllm}, torch {torch}). Generated, do not edit:",
        "#   python3 docker/gpu_lock.py lock",
        (f"# on {datetime.date.today().isoformat()} with pip {pip_version}, CPython {platform.python_version()}, "
         "linux x86_64, PyPI only, from `python3 docker/gpu_lock.py requirements`"),
        "# (pyproject's dependencies + the workflow and vllm extras + torch==2.13.0, setuptools, wheel).",
    ]
    LOCK.write_text("\n".join(head + [f"{n}=={v}" for n, v in pins]) + "\n")
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(pins)} pins")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) == 2 else ""
    if cmd == "requirements":
        print("\n".join(requirements()))
    elif cmd == "lock":
        lock()
    else:
        sys.exit(__doc__)
