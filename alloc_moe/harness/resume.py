"""Per-item checkpoints of a multi-item job, so that a killed job, run again, loses at most the item in flight.

`alloc-moe eval` evaluates every plan of a budget in one process and writes its outputs at the end; Snakemake deletes
a killed job's declared outputs. With `--resume-dir DIR` (outside the declared outputs), each finished plan's result
is written atomically to `DIR/<key digest>.json`, where the key is everything that determines the result (plan
bytes, model files, tasks and their data, settings, code, environment). A rerun reuses a checkpoint only if its key
matches exactly; anything else in DIR is stale and removed (a directory belongs to one job). Once the job has written
its outputs, its checkpoints are removed.

Fingerprints: a file by its sha256; a directory (a model checkpoint: gigabytes of weights) by every file's relative
path, size and modification time (rewriting a file changes it); a hub id by the cached snapshot's commit, if any.
"""

import hashlib
import json
import os
from pathlib import Path

from ..io import atomic_write_text, sha256_file

FORMAT = 1


def digest(key: dict) -> str:
    """sha256 of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _hub_snapshot(name: str) -> str | None:
    """The commit of the hub model `name` in the local cache (None if not cached or not a hub id)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no hub library: no snapshot
        return None
    return Path(hit).parent.name if isinstance(hit, str) else None


def fingerprint(path: str | os.PathLike) -> dict:
    """What identifies the contents of `path`: see the module docstring."""
    p = Path(path)
    if p.is_file():
        return {"file": str(path), "sha256": sha256_file(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"dir": str(path), "files": [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns]
                                            for f in files]}
    return {"name": str(path), "hub_snapshot": _hub_snapshot(str(path))}


class Checkpoints:
    """The checkpoints of one job in `directory`, one per key (`keys[i]` belongs to item i)."""

    def __init__(self, directory: str | os.PathLike, keys: list[dict], log=print):
        self.dir = Path(directory)
        self.keys = [json.loads(json.dumps({"format": FORMAT, **k}, default=str)) for k in keys]  # as stored
        self.names = [f"{digest(k)}.json" for k in self.keys]
        self.log = log

    def remove_stale(self) -> None:
        """Remove every file of the directory that is no current item's checkpoint (older code, other settings,
        half-written temporary files of a killed write)."""
        if not self.dir.is_dir():
            return
        for f in sorted(self.dir.iterdir()):
            if f.is_file() and f.name not in self.names:
                self.log(f"removing stale checkpoint {f}")
                f.unlink()

    def load(self, i: int) -> dict | None:
        """Item i's result from its checkpoint, or None; a file that does not hold exactly item i's key is ignored."""
        path = self.dir / self.names[i]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or digest(data.get("key", {})) != digest(self.keys[i]) or "result" not in data:
            self.log(f"ignoring checkpoint {path}: it does not match")
            return None
        return data["result"]

    def save(self, i: int, result: dict) -> Path:
        path = self.dir / self.names[i]
        atomic_write_text(path, json.dumps({"key": self.keys[i], "result": result}, indent=1) + "\n")
        return path

    def clear(self) -> None:
        """Remove this job's checkpoints (and the directory, if that leaves it empty)."""
        for name in set(self.names):
            (self.dir / name).unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass
