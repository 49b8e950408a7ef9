"""Run manifests: what produced a run's summary tables (config hash, git commit, versions, hardware).

Every run directory gets `summary/manifest.json`; `alloc-moe regress` compares two runs only when their config
hashes agree. The config hash is the sha256 of the canonical JSON of the resolved config (keys sorted, no
whitespace), so key order and YAML formatting do not change it.
"""

import hashlib
import json
from pathlib import Path

from .errors import AllocMoeError
from .io import atomic_write_text

MANIFEST = "manifest.json"


def canonical_json(config: dict) -> str:
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AllocMoeError(f"the config cannot be hashed as JSON ({e}); allowed: dicts, lists, strings, finite numbers, "
                            "booleans, null") from None


def config_hash(config: dict) -> str:
    """sha256 (hex) of the canonical JSON of the resolved config."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def write_manifest(directory: str | Path, config: dict) -> Path:
    """Write `<directory>/summary/manifest.json` (atomically) and return its path."""
    from .provenance import environment

    path = Path(directory) / "summary" / MANIFEST
    manifest = {"config_hash": config_hash(config), "config": json.loads(canonical_json(config)), **environment()}
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
        raise AllocMoeError(f"{path} is not readable JSON ({e}); it is written by alloc_moe.manifest.write_manifest") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config_hash"), str):
        raise AllocMoeError(f"{path} has no 'config_hash' string; it is written by alloc_moe.manifest.write_manifest")
    return manifest
