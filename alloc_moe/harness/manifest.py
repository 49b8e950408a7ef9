"""Run manifests: what produced a run's summary tables (config hash, git commit, versions, hardware, file hashes).

Every run directory gets `summary/manifest.json` (the workflow's `manifest` rule writes `results/summary/`'s);
`alloc-moe regress` compares two runs only when their config hashes agree. The config hash is the sha256 of the
canonical JSON of the resolved config (keys sorted, no whitespace), so key order and YAML formatting do not change
it. `files` maps each summary table the manifest covers to its sha256, so every row of those tables is traceable to
this manifest; a table edited after the run no longer matches (`changed_files`). The hardware is that of the
machine that wrote the manifest; each `eval/<label>/<plan>.json` also records the environment of the job that evaluated it.
"""

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from ..errors import AllocMoeError
from ..io import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
# distributions whose versions can move results, next to python / torch / transformers (provenance.environment)
PACKAGES = ("numpy", "pandas", "tokenizers", "safetensors", "lm_eval", "snakemake", "vllm")


def canonical_json(config: dict) -> str:
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AllocMoeError(f"the config cannot be hashed as JSON ({e}); allowed: dicts, lists, strings, finite numbers, "
                            "booleans, null") from None


def config_hash(config: dict) -> str:
    """sha256 (hex) of the canonical JSON of the resolved config."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str | None]:
    """Installed versions of PACKAGES (None: not installed), read from the distribution metadata without importing."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict:
    """CPU model and logical CPU count (the GPU, if any, is `gpu` in provenance.environment)."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


def checkpoints(config: dict) -> dict:
    """model name -> {path, revision, commit} for the config's hub checkpoints: the commit their revision (default main)
    resolved to in the local hub cache (a stage's, offline), which is the one the run loaded; None where unknown."""
    from ..backends.hf.loading import is_hub_id, resolved_commit

    out = {}
    for name, spec in sorted((config.get("models") or {}).items()):
        if spec and "path" in spec and is_hub_id(spec["path"]):
            revision = spec.get("revision") or "main"
            out[name] = {"path": spec["path"], "revision": revision,
                         "commit": resolved_commit(f"{spec['path']}@{revision}")}
    return out


def write_manifest(directory: str | Path, config: dict, files=()) -> Path:
    """Write `<directory>/summary/manifest.json` (atomically) and return its path. `files`: the summary tables it
    covers, recorded by file name with their sha256. `checkpoints` records the commit each hub checkpoint resolved to
    (a branch such as main moves; the commit does not)."""
    from .provenance import environment

    path = Path(directory) / "summary" / MANIFEST
    hashes = {Path(f).name: sha256_file(f) for f in files}
    manifest = {"config_hash": config_hash(config), "config": json.loads(canonical_json(config)), **environment(),
                "packages": package_versions(), "hardware": hardware(), "files": hashes}
    if ckpts := checkpoints(config):
        manifest["checkpoints"] = ckpts
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(summary_dir: str | Path) -> dict | None:
    """The manifest of a summary directory, or None when it has none."""
    path = Path(summary_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AllocMoeError(f"{path} is not readable JSON ({e}); it is written by alloc_moe.harness.manifest.write_manifest") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config_hash"), str):
        raise AllocMoeError(f"{path} has no 'config_hash' string; it is written by alloc_moe.harness.manifest.write_manifest")
    if not isinstance(manifest.get("files", {}), dict):
        raise AllocMoeError(f"{path}: 'files' must map file names to sha256; it is written by "
                            "alloc_moe.harness.manifest.write_manifest")
    return manifest


def changed_files(summary_dir: str | Path, manifest: dict) -> list[str]:
    """The files the manifest covers that are missing from `summary_dir` or whose sha256 no longer matches."""
    summary_dir = Path(summary_dir)
    return [name for name, digest in sorted(manifest.get("files", {}).items())
            if not (summary_dir / name).is_file() or sha256_file(summary_dir / name) != digest]
