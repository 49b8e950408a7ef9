"""`alloc-moe download`: one split of a hub text dataset (`data.SOURCES`: WikiText2 / C4 / Pile at pinned revisions),
or a local copy of it, into the JSONL the synthetic calibration sets use (`{"family": <source>, "text": <row>}` per
row, rows in dataset order), with a sidecar `<out minus .jsonl>.meta.json` recording the source, its revision and
the sha256 of the JSONL.

A re-run with the same request verifies the JSONL against its sidecar and downloads nothing; a JSONL that no longer
matches its checksum is an error (a corrupted cache is not silently replaced: delete it, or pass --force). Without
the Hub (no network, HF_DATASETS_OFFLINE=1) the command fails with one line naming the workflow config key
(`download.local.<source>_<split>`) where a local copy of the split can be given instead; nothing is written.

With a stage directory (`--stage DIR`, or ALLOC_MOE_STAGE_DIR, which the workflow sets for `offline.stage_dir`) the
split is copied from the JSONL and sidecar `alloc-moe stage` wrote there (`staged_path`), checksum verified: the same
bytes and sidecar as a download from the Hub, without network.
"""

import json
import os
import shutil
from pathlib import Path

from ..errors import AllocMoeError
from ..io import atomic_path, atomic_write_text, sha256_file
from .text import SOURCES, Document, _cap_chars, _iter_texts

# local file ending -> the `datasets` builder that reads it (compressed files keep their inner ending: .json.gz)
LOCAL_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text", ".arrow": "arrow",
                  ".csv": "csv"}
COMPRESSION = (".gz", ".zst", ".bz2", ".xz")


STAGE_ENV = "ALLOC_MOE_STAGE_DIR"  # a stage directory (alloc_moe.data.stage) the split is copied from instead of the Hub


def staged_path(stage_dir: str | Path, source: str, split: str, max_chars: int | None) -> Path:
    """Where a stage keeps a split: <stage>/text/<source>_<split>.jsonl, or .max<N>.jsonl when cut at N characters."""
    return Path(stage_dir) / "text" / f"{source}_{split}{f'.max{max_chars}' if max_chars else ''}.jsonl"


def meta_path(out: str | Path) -> Path:
    """The sidecar of a downloaded JSONL: results/data/wikitext2_test.jsonl -> results/data/wikitext2_test.meta.json."""
    return Path(out).with_suffix(".meta.json")


def config_key(source: str, split: str) -> str:
    """The workflow config key that gives a local copy of this split instead of the Hub."""
    return f"download.local.{source}_{split}"


def _builder(local: Path) -> str:
    suffixes = [s.lower() for s in local.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    if not suffixes or suffixes[-1] not in LOCAL_BUILDERS:
        raise AllocMoeError(f"local copy {str(local)!r}: unsupported file type; allowed endings: "
                            f"{', '.join(LOCAL_BUILDERS)} (optionally compressed: {', '.join(COMPRESSION)})")
    return LOCAL_BUILDERS[suffixes[-1]]


def request(source: str, split: str, *, local: str | Path | None = None, max_chars: int | None = None) -> dict:
    """What the JSONL is made of; a cached file answers a request when its sidecar records the same values."""
    spec = SOURCES[source]
    if local is None:
        origin = {"dataset": spec.path, "config": spec.name, "data_files": spec.data_files, "revision": spec.revision}
    else:
        origin = {"local_file": str(local), "local_sha256": sha256_file(local)}
    return {"source": source, "split": split, "text_field": spec.text_field, "max_chars": max_chars, **origin}


def _load(source: str, split: str, local: Path | None):
    """The split as a `datasets.Dataset` (from the Hub at the pinned revision, or from the local file)."""
    try:
        import datasets
        import huggingface_hub
    except ImportError:
        raise AllocMoeError("download needs the `datasets` package: pip install 'alloc-moe[data]'") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # no "Retrying in 8s" lines: the failure is one line below
    spec = SOURCES[source]
    if local is None:
        kwargs, where = spec.load_kwargs(split), f"{spec.path}@{spec.revision[:12]} split {split!r}"
    else:
        kwargs, where = {"path": _builder(local), "data_files": {split: str(local)}, "split": split}, repr(str(local))
    try:
        ds = datasets.load_dataset(**kwargs)
    except Exception as e:  # noqa: BLE001 - any hub/network/format failure is a user-facing input problem
        msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if local is not None:
            raise AllocMoeError(f"cannot read the local copy {where} of {source}: {msg}") from None
        raise AllocMoeError(
            f"cannot fetch {source} ({where}) from the Hugging Face Hub ({msg}); without network give a local copy "
            f"of that split under the config key {config_key(source, split)} (alloc-moe download --local FILE; "
            f"{', '.join(LOCAL_BUILDERS)} files, compressed or not)") from None
    if spec.text_field not in ds.column_names:
        raise AllocMoeError(f"{source} {where} has no {spec.text_field!r} column (columns: {', '.join(ds.column_names)})")
    return ds


def verify(out: Path, meta: dict) -> None:
    digest = sha256_file(out)
    if digest != meta.get("sha256"):
        raise AllocMoeError(f"cached {str(out)!r} is corrupted: its sha256 is {digest[:16]}..., its sidecar "
                            f"{str(meta_path(out))!r} records {str(meta.get('sha256'))[:16]}...; delete it (or pass "
                            "--force) to download it again")


def _cached(out: Path, want: dict) -> dict | None:
    """The sidecar of `out` when it records `want` and the file still matches its checksum; None when not cached."""
    meta = meta_path(out)
    if not (out.is_file() and meta.is_file()):
        return None
    try:
        recorded = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(recorded, dict) or {k: recorded.get(k) for k in want} != want:
        return None
    verify(out, recorded)
    return recorded


def _from_stage(source: str, split: str, out: Path, want: dict, stage: Path) -> dict:
    """Copy the staged JSONL that answers `want` (checksum verified) to `out`, with its sidecar; the sidecar."""
    staged = staged_path(stage, source, split, want["max_chars"])
    recorded = _cached(staged, want)
    if recorded is None:
        cut = f" cut at {want['max_chars']} characters" if want["max_chars"] else ""
        raise AllocMoeError(f"the stage {str(stage)!r} holds no {source} split {split!r}{cut} at revision "
                            f"{str(want.get('revision'))[:12]} ({staged.name} with its sidecar); stage it where the Hub "
                            f"is reachable: alloc-moe stage --configfile CONFIG --out {stage}")
    meta_path(out).unlink(missing_ok=True)
    with atomic_path(out) as tmp:
        shutil.copyfile(staged, tmp)
    atomic_write_text(meta_path(out), json.dumps(recorded, indent=1) + "\n")
    return recorded


def download(source: str, out: str | Path, *, split: str | None = None, local: str | Path | None = None,
             max_chars: int | None = None, force: bool = False, stage: str | Path | None = None,
             loader=None) -> tuple[dict, bool]:
    """Write `out` (JSONL) and its sidecar; returns (sidecar, whether the cache answered without loading).

    `stage`: copy the split from that stage directory instead of the Hub (not with `local`). `loader(source, split)`:
    what returns the Hub's split as a `datasets.Dataset` (`alloc_moe.data.stage`'s sources; default: the Hub itself)."""
    if source not in SOURCES:
        raise AllocMoeError(f"unknown dataset {source!r}; allowed: {', '.join(SOURCES)}")
    if max_chars is not None and max_chars < 1:
        raise AllocMoeError(f"--max-chars must be >= 1, got {max_chars}")
    out, split = Path(out), split or SOURCES[source].split
    if out.suffix != ".jsonl":
        raise AllocMoeError(f"--out must end in .jsonl, got {str(out)!r}")
    if local is not None:
        local = Path(local)
        if not local.is_file():
            raise AllocMoeError(f"local copy of {source} not found: {str(local)!r}")
        _builder(local)
    want = request(source, split, local=local, max_chars=max_chars)
    if not force and (recorded := _cached(out, want)) is not None:
        return recorded, True
    if local is None and stage is not None:
        return _from_stage(source, split, out, want, Path(stage)), False
    ds = loader(source, split) if loader is not None and local is None else _load(source, split, local)
    docs = _cap_chars((Document(t, source) for t in _iter_texts(ds, SOURCES[source].text_field)), max_chars)
    meta_path(out).unlink(missing_ok=True)  # a JSONL without its sidecar is never taken for a cache hit
    rows = chars = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"family": d.family, "text": d.text}) + "\n")
            rows, chars = rows + 1, chars + len(d.text)
        if not chars:
            raise AllocMoeError(f"{source} split {split!r} holds no text")
    recorded = {**want, "rows": rows, "chars": chars, "sha256": sha256_file(out)}
    atomic_write_text(meta_path(out), json.dumps(recorded, indent=1) + "\n")
    return recorded, False


def register_cli(sub) -> None:
    p = sub.add_parser(
        "download", help="fetch WikiText2 / C4 / Pile (pinned revisions) into a checksummed calibration JSONL",
        description="Write one split of a hub text dataset as calibration JSONL ({\"family\", \"text\"} per row) with "
                    "a .meta.json sidecar (source, revision, sha256). A re-run verifies the cached file instead.")
    p.add_argument("--dataset", required=True, choices=list(SOURCES))
    p.add_argument("--split", default=None,
                   help="default: " + ", ".join(f"{k} {v.split}" for k, v in SOURCES.items()))
    p.add_argument("--local", metavar="FILE", default=None,
                   help="read this local copy of the split instead of the Hub (" + ", ".join(LOCAL_BUILDERS) + ")")
    p.add_argument("--max-chars", type=int, default=None, help="keep rows in order up to this many characters")
    p.add_argument("--force", action="store_true", help="load again even when a verified cached file answers")
    p.add_argument("--stage", metavar="DIR", default=os.environ.get(STAGE_ENV) or None,
                   help=f"copy the split from this stage directory (alloc-moe stage) instead of the Hub (default: "
                        f"${STAGE_ENV}, which the workflow sets for offline.stage_dir)")
    p.add_argument("--out", required=True, help="JSONL to write; the sidecar is <out minus .jsonl>.meta.json")
    p.set_defaults(func=_cmd_download)


def _cmd_download(args) -> int:
    meta, cached = download(args.dataset, args.out, split=args.split, local=args.local, max_chars=args.max_chars,
                            force=args.force, stage=args.stage)
    origin = meta.get("local_file") or f"{meta['dataset']}@{meta['revision'][:12]}"
    staged = not cached and args.stage and not args.local
    verb = "verified cached" if cached else "copied" if staged else "wrote"
    print(f"{verb} {args.out}: {meta['rows']} rows, {meta['chars']} characters of {args.dataset} split "
          f"{meta['split']} ({origin}{f', from the stage {args.stage}' if staged else ''}), "
          f"sha256 {meta['sha256'][:16]}...")
    return 0
