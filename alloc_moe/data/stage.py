"""`alloc-moe stage`: everything a workflow config downloads, staged into one directory, for GPU machines without
network.

What a config downloads (`needs`):
- checkpoints: every model whose `path` is a hub id, at its `revision` (default main), as a Hugging Face hub cache
  `DIR/hub/models--<org>--<name>/snapshots/<commit>/` (`huggingface_hub.snapshot_download`; a repository that has
  safetensors gets no duplicate weight formats). With HF_HUB_CACHE=DIR/hub the hub id loads offline; the workflow
  passes the snapshot folder itself.
- lm-eval datasets: every leaf task of the models' `tasks` (the `paper` suite, lm-eval task / group / tag names, task
  YAML files or folders) names a `dataset_path` / `dataset_name`; each is prepared by `datasets.load_dataset` into a
  datasets cache `DIR/datasets/`, which the same `load_dataset(path, name)` call (what lm-eval makes) reads with
  HF_DATASETS_OFFLINE=1 and HF_DATASETS_CACHE=DIR/datasets. A task that streams its data (`dataset_kwargs:
  {streaming: true}`: GroundCocoa) is prepared in full; `datasets` streams it from that cache offline.
- text: the calibration sets and evaluation text the `download` rule fetches (`alloc_moe.data.text.SOURCES` at their pinned
  revisions, up to `download.max_chars`), as the JSONL and sidecar the rule writes (`DIR/text/`,
  `download.staged_path`); `alloc-moe download` copies them when ALLOC_MOE_STAGE_DIR is set.

`DIR/stage.json`, the manifest, records each item: the revision asked for and the commit it resolved to, and every
file with its size and sha256 (no timestamps: the same items give the same bytes), plus which datasets each lm-eval
task uses (with lm-eval's version). An item belongs to the stage once the manifest records it, and the manifest is
rewritten (atomically) after every item: an interrupted stage resumes, and a re-run skips what is complete. Files
arrive atomically: `huggingface_hub` and `datasets` download and prepare into temporary names and rename, text goes
through `io.atomic_path`, a mirror's items are assembled in a temporary folder and renamed into place.

`check` answers, before any job runs, whether a stage holds everything a config needs (files present at their
recorded sizes; `verify` also recomputes every sha256), with one line naming what is missing. The workflow runs it at
start-up for `offline: {stage_dir: DIR}` and then sets `offline_env(DIR)` for every job.

Where items come from is a source: `HubSource` (the Hugging Face Hub) or `MirrorSource` (a local folder laid out like
the hub, see its docstring: an internal mirror, and the tests' stand-in for the hub).
"""

import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..backends.hf.loading import is_hub_id
from ..errors import AllocMoeError
from ..io import atomic_write_text, sha256_file
from .download import meta_path, staged_path
from .text import SOURCES

MANIFEST = "stage.json"
FORMAT = 1
# weight formats left out of a checkpoint that has safetensors (the loaders read only those then)
DUPLICATE_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "*.tflite"]
SPACE_MARGIN = 1.05  # free space must exceed the estimate by 5 %
REVISION = re.compile(r"[^\s@]+")


# ---- what a config needs ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelNeed:
    repo: str
    revision: str
    users: tuple[str, ...]  # the config's model names that load it

    @property
    def key(self) -> str:
        return f"{self.repo}@{self.revision}"

    def describe(self) -> str:
        return f"checkpoint {self.key}"


@dataclasses.dataclass(frozen=True)
class DatasetNeed:
    path: str
    name: str | None
    kwargs: str  # canonical JSON of the task's other `dataset_kwargs` (`streaming` dropped: it is prepared in full)
    streaming: bool
    tasks: tuple[str, ...]

    @property
    def key(self) -> str:
        extra = "" if self.kwargs == "{}" else f" {self.kwargs}"
        return f"{self.path}{f':{self.name}' if self.name else ''}{extra}"

    def describe(self) -> str:
        more = f" and {len(self.tasks) - 1} more" if len(self.tasks) > 1 else ""
        note = "; it streams from the Hub, staged as a prepared copy" if self.streaming else ""
        return f"dataset {self.key} (task {self.tasks[0]}{more}{note})"


@dataclasses.dataclass(frozen=True)
class TextNeed:
    source: str
    split: str
    max_chars: int | None

    @property
    def key(self) -> str:
        return staged_path(".", self.source, self.split, self.max_chars).name.removesuffix(".jsonl")

    @property
    def revision(self) -> str:
        return SOURCES[self.source].revision

    def describe(self) -> str:
        cut = f" (first {self.max_chars} characters)" if self.max_chars else ""
        return f"text {self.source} split {self.split}{cut}"


@dataclasses.dataclass
class Needs:
    models: list[ModelNeed]
    datasets: list[DatasetNeed]
    texts: list[TextNeed]
    tasks: dict[str, list[str]]  # lm-eval task name -> the dataset keys of its leaf tasks

    def items(self) -> list:
        return [*self.texts, *self.datasets, *self.models]

    def summary(self) -> str:
        return (f"{len(self.models)} checkpoint(s), {len(self.datasets)} dataset(s) of {len(self.tasks)} lm-eval "
                f"task name(s), {len(self.texts)} text split(s)")


def _merge(base: dict, over: dict) -> dict:
    """`over` merged into `base` as Snakemake merges --configfile files: nested dicts key by key, the rest replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(paths: list[str | Path]) -> dict:
    """Workflow config files merged in order (as `snakemake --configfile A B`); models set to null are left out."""
    import yaml

    config: dict = {}
    for p in paths:
        try:
            data = yaml.safe_load(Path(p).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise AllocMoeError(f"cannot read config file {str(p)!r}: {(str(e).splitlines() or [''])[0]}") from None
        if not isinstance(data, dict):
            raise AllocMoeError(f"config file {str(p)!r} is not a YAML mapping")
        config = _merge(config, data)
    if not isinstance(config.get("models"), dict):
        raise AllocMoeError("the config has no `models:` mapping; give the workflow config files (config/paper.yaml)")
    config["models"] = {k: v for k, v in config["models"].items() if v is not None}
    return config


def _revision_of(name: str, spec: dict) -> str | None:
    revision = spec.get("revision")
    if revision is not None and (not isinstance(revision, str) or not REVISION.fullmatch(revision)):
        raise AllocMoeError(f"models.{name}.revision: {revision!r} is not a revision; allowed: a branch, tag or "
                            "commit sha without spaces or '@'")
    if revision is not None and not ("path" in spec and is_hub_id(spec["path"])):
        raise AllocMoeError(f"models.{name}.revision: the model's path {spec.get('path')!r} is not a hub id "
                            "(org/name); a revision applies to hub checkpoints only")
    return revision


def model_needs(config: dict) -> list[ModelNeed]:
    """The hub checkpoints of the config's models (`path:` a hub id), at their revisions (default main)."""
    users: dict[tuple[str, str], list[str]] = {}
    for name, spec in sorted(config["models"].items()):
        revision = _revision_of(name, spec)
        if "path" in spec and is_hub_id(spec["path"]):
            users.setdefault((spec["path"], revision or "main"), []).append(name)
    return [ModelNeed(repo, rev, tuple(u)) for (repo, rev), u in sorted(users.items())]


def text_needs(config: dict) -> list[TextNeed]:
    """The hub text splits the `download` rule fetches: calibration sets and evaluation text that name a source (its
    default split) or `results/data/<source>_<split>.jsonl`, less those given a local copy (`download.local`)."""
    cal, dl = config.get("calibration") or {}, config.get("download") or {}
    default = cal.get("default", "balanced")
    names = [default, *(cal.get("sets") or []), (config.get("evaluation") or {}).get("text")]
    pattern = re.compile(rf"results/data/({'|'.join(SOURCES)})_([a-z]+)\.jsonl")
    splits = []
    for name in names:
        if name in SOURCES:
            splits.append((name, SOURCES[name].split))
        elif isinstance(name, str) and (m := pattern.fullmatch(name)):
            splits.append(m.groups())
    local = dl.get("local") or {}
    return [TextNeed(s, sp, dl.get("max_chars")) for s, sp in dict.fromkeys(splits) if f"{s}_{sp}" not in local]


def task_items(config: dict) -> list[str]:
    """The `tasks` values of every model, split at commas, in config order, without repeats."""
    items = []
    for spec in config["models"].values():
        items += [t.strip() for t in str(spec.get("tasks", "embedded")).split(",") if t.strip()]
    return list(dict.fromkeys(items))


@functools.cache
def _builtin_index() -> dict:
    """lm-eval's built-in task index (seconds to build: once per process)."""
    import logging

    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its duplicate-name notes about built-in tasks
    return TaskIndex.build([Path(lm_eval.tasks.__file__).parent])


class TaskConfigs:
    """lm-eval's task registry as configs (YAML with includes resolved, `!function`s not imported), the built-in
    part built on first use."""

    def index(self) -> dict:
        return _builtin_index()

    def of_file(self, path: Path) -> tuple[dict, dict]:
        """(registry, entry) for a task or group YAML file: its folder's tasks over the built-in ones."""
        from lm_eval.tasks._index import TaskIndex

        local = TaskIndex.build([path.parent])
        entry = next((e for e in local.values() if e.yaml_path and Path(e.yaml_path).resolve() == path.resolve()), None)
        if entry is None:
            raise AllocMoeError(f"task file {str(path)!r} defines no lm-eval task or group")
        return _Registry(local, self), entry


class _Registry:
    """A folder's task entries, falling back to lm-eval's built-in ones."""

    def __init__(self, local: dict, configs: TaskConfigs):
        self.local, self.configs = local, configs

    def get(self, name):
        return self.local.get(name) or self.configs.index().get(name)


def _group_fields() -> set[str]:
    from lm_eval.tasks._factory import GROUP_FIELD_NAMES

    return set(GROUP_FIELD_NAMES) | {"tag"}


def leaf_tasks(name: str, registry, overrides: dict | None = None, depth: int = 0):
    """(task name, config) of every task a task / group / tag name runs, with group-level settings applied as
    lm-eval's TaskFactory applies them (the caller's over the group's, a member's own dict over both)."""
    from lm_eval.tasks._index import Kind

    entry = registry.get(name)
    if entry is None or depth > 20:
        raise AllocMoeError(f"unknown lm-eval task {name!r}; give lm-eval task, group or tag names, suite names or "
                            "task YAML paths")
    if entry.kind is Kind.TAG:
        for t in sorted(entry.tags):
            yield from leaf_tasks(t, registry, overrides, depth + 1)
    elif entry.kind is Kind.GROUP:
        cfg = entry.cfg or {}
        merged = {**{k: v for k, v in cfg.items() if k not in _group_fields()}, **(overrides or {})}
        for item in cfg.get("task") or []:
            child = item if isinstance(item, str) else item.get("task") or item.get("group")
            extra = {} if isinstance(item, str) else {k: v for k, v in item.items() if k not in ("task", "group")}
            if registry.get(child) is not None:
                yield from leaf_tasks(child, registry, {**merged, **extra}, depth + 1)
            elif "dataset_path" in {**merged, **extra}:  # an inline task of the group
                yield f"{name}::{child}", {**merged, **extra}
            else:
                raise AllocMoeError(f"lm-eval group {name!r} names an unknown member {child!r}")
    elif entry.kind is Kind.PY_TASK:
        raise AllocMoeError(f"lm-eval task {name!r} is a Python class; its dataset cannot be read from a config, so "
                            "it cannot be staged")
    else:
        yield name, {**(entry.cfg or {}), **(overrides or {})}


def _packaged_builders() -> set[str]:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return set(_PACKAGED_DATASETS_MODULES)


def dataset_of(task: str, cfg: dict, packaged: set[str]) -> DatasetNeed | None:
    """The hub dataset a leaf task loads; None for local data (a packaged builder such as json with data_files, or a
    folder)."""
    path = cfg.get("dataset_path")
    if path is None:
        if cfg.get("custom_dataset"):
            raise AllocMoeError(f"lm-eval task {task!r} builds its dataset in Python (custom_dataset); it cannot be "
                                "staged")
        return None
    if path in packaged or os.path.isdir(path):
        return None
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    streaming = bool(kwargs.pop("streaming", False))
    name = cfg.get("dataset_name")
    return DatasetNeed(str(path), None if name is None else str(name), json.dumps(kwargs, sort_keys=True), streaming,
                       (task,))


def _expand(item: str, configs: TaskConfigs) -> list[tuple[str, object]]:
    """(lm-eval name, registry) pairs a `tasks` item stands for; [] for the embedded suite (local data)."""
    from .tasks import EMBEDDED_NAMES, SUITE_NAMES, suite

    if item in EMBEDDED_NAMES:
        return []
    if item in SUITE_NAMES:
        return [(s.name, None) for s in suite(item)]
    if item.endswith((".yaml", ".yml")) or Path(item).is_dir():
        p = Path(item)
        files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
        if not p.exists() or not files:
            raise AllocMoeError(f"task path {item!r} not found (give a task YAML file or a folder of them)")
        return [(entry.name, registry) for registry, entry in map(configs.of_file, files)]
    return [(item, None)]


def task_needs(config: dict, *, known: dict[str, list[str]] | None = None, datasets: dict | None = None):
    """(datasets, task name -> dataset keys) of the config's tasks. With `known` (a manifest's task map, valid for the
    installed lm-eval), names found there are not looked up in lm-eval's registry; `datasets` then gives their needs
    (a manifest's dataset entries)."""
    configs, needs, tasks, packaged = TaskConfigs(), {}, {}, None
    for item in task_items(config):
        for name, registry in _expand(item, configs):
            if known is not None and registry is None and name in known:
                tasks[name] = known[name]
                for key in known[name]:
                    needs.setdefault(key, _need_from_entry(key, (datasets or {}).get(key), name))
                continue
            packaged = packaged if packaged is not None else _packaged_builders()
            keys = []
            for leaf, cfg in leaf_tasks(name, registry or configs.index()):
                need = dataset_of(leaf, cfg, packaged)
                if need is None:
                    continue
                old = needs.get(need.key)
                needs[need.key] = need if old is None else dataclasses.replace(old, tasks=(*old.tasks, leaf))
                keys.append(need.key)
            tasks[name] = list(dict.fromkeys(keys))
    return list(needs.values()), tasks


def _need_from_entry(key: str, entry: dict | None, task: str) -> DatasetNeed:
    if entry is None:  # the task map names a dataset the manifest lacks: report it as missing
        return DatasetNeed(key, None, "{}", False, (task,))
    return DatasetNeed(entry["path"], entry["name"], json.dumps(entry["kwargs"], sort_keys=True), entry["streaming"],
                       tuple(entry["tasks"]))


def lm_eval_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def needs(config: dict, manifest: dict | None = None) -> Needs:
    """Everything the config downloads. A manifest written with the installed lm-eval answers task names without
    lm-eval's registry (fast: the workflow checks a stage at every start)."""
    known = manifest.get("tasks") if manifest and manifest.get("lm_eval") == lm_eval_version() else None
    datasets, tasks = task_needs(config, known=known, datasets=(manifest or {}).get("datasets"))
    return Needs(model_needs(config), datasets, text_needs(config), tasks)


# ---- the manifest -------------------------------------------------------------------------------------------------
def empty_manifest() -> dict:
    return {"format": FORMAT, "lm_eval": lm_eval_version(), "models": {}, "datasets": {}, "tasks": {}, "text": {}}


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AllocMoeError(f"{str(root)!r} is not a stage directory (no {MANIFEST}); write one with alloc-moe stage "
                            f"--configfile CONFIG --out {root}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AllocMoeError(f"{path} is not readable JSON ({e}); stage again into a new directory") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AllocMoeError(f"{path} is not a format-{FORMAT} stage manifest; stage again into a new directory")
    return manifest


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def model_entry(manifest: dict, repo: str, revision: str) -> dict | None:
    """The staged checkpoint for repo@revision: staged under that revision, or at the commit `revision` names."""
    models = manifest.get("models", {})
    if f"{repo}@{revision}" in models:
        return models[f"{repo}@{revision}"]
    return next((e for _, e in sorted(models.items()) if e["repo"] == repo and e["commit"] == revision), None)


def _entry(manifest: dict, need) -> dict | None:
    if isinstance(need, ModelNeed):
        return model_entry(manifest, need.repo, need.revision)
    if isinstance(need, DatasetNeed):
        return manifest.get("datasets", {}).get(need.key)
    entry = manifest.get("text", {}).get(need.key)
    return entry if entry and entry.get("revision") == need.revision else None


def _folder(root: Path, need, entry: dict) -> Path:
    rel = entry["snapshot"] if isinstance(need, ModelNeed) else entry["cache"] if isinstance(need, DatasetNeed) else "text"
    return root / rel


def file_records(folder: Path, names: list[str] | None = None) -> dict:
    """{relative path: {bytes, sha256}} of the files under `folder` (symlinks followed; lock files left out)."""
    paths = [folder / n for n in names] if names else sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}


def problem(root: Path, manifest: dict, need, *, verify: bool = False) -> str | None:
    """Why `need` is not complete in the stage (None: complete): no manifest entry, a missing file, a size (or with
    `verify` a sha256) other than recorded."""
    entry = _entry(manifest, need)
    if entry is None:
        return "not staged"
    folder = _folder(root, need, entry)
    for rel, rec in sorted(entry["files"].items()):
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != rec["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest records {rec['bytes']}"
        if verify and sha256_file(p) != rec["sha256"]:
            return f"{rel} does not match its recorded sha256"
    return None


# ---- sources ------------------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _snake(name: str) -> str:
    from datasets.naming import camelcase_to_snakecase

    return camelcase_to_snakecase(name)


def dataset_cache_name(path: str) -> str:
    """The folder of a hub dataset in a datasets cache: org/CamelName -> org___camel_name (datasets' own naming)."""
    *org, name = path.split("/")
    return "___".join([*org, _snake(name)])


def _prepared_folder(ds) -> Path:
    """The folder of a prepared `DatasetDict`'s arrow files."""
    files = {Path(f["filename"]).parent for split in ds.values() for f in split.cache_files}
    if len(files) != 1:
        raise AllocMoeError(f"the prepared dataset is spread over {len(files)} folders; expected one")
    return files.pop()


class HubSource:
    """The Hugging Face Hub: `snapshot_download` for checkpoints, `datasets.load_dataset` for datasets and text."""

    label = "hub"

    def __init__(self, progress: bool = True):
        self.progress = progress
        self._plans: dict[str, tuple[int, list[str]]] = {}
        self._infos: dict[tuple[str, str | None], object] = {}
        import huggingface_hub

        if not progress:
            huggingface_hub.utils.disable_progress_bars()

    def resolve_model(self, repo: str, revision: str) -> str:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo, revision=revision).sha

    def _plan(self, need: ModelNeed) -> tuple[int, list[str]]:
        """(bytes of the files to fetch, ignore patterns) from a dry run of snapshot_download: a repository with
        safetensors gets no duplicate weight formats."""
        if need.key not in self._plans:
            from fnmatch import fnmatch

            from huggingface_hub import snapshot_download

            files = snapshot_download(need.repo, revision=need.revision, dry_run=True)
            ignore = DUPLICATE_WEIGHTS if any(f.filename.endswith(".safetensors") for f in files) else []
            size = sum(f.file_size or 0 for f in files if not any(fnmatch(f.filename, p) for p in ignore))
            self._plans[need.key] = (size, ignore)
        return self._plans[need.key]

    def model_bytes(self, need: ModelNeed) -> int:
        return self._plan(need)[0]

    def stage_model(self, need: ModelNeed, hub_dir: Path) -> Path:
        from huggingface_hub import snapshot_download

        ignore = self._plan(need)[1]
        return Path(snapshot_download(need.repo, revision=need.revision, cache_dir=hub_dir, ignore_patterns=ignore))

    def _dataset_info(self, need: DatasetNeed):
        """The repository's info at the task's revision (default main), asked once per repository."""
        from huggingface_hub import HfApi

        revision = json.loads(need.kwargs).get("revision")
        if (need.path, revision) not in self._infos:
            self._infos[need.path, revision] = HfApi().dataset_info(need.path, revision=revision, files_metadata=True)
        return self._infos[need.path, revision]

    def dataset_bytes(self, need: DatasetNeed) -> int:
        """The prepared size the dataset card records for the config, else the repository's size."""
        info = self._dataset_info(need)
        cards = (info.card_data or {}).get("dataset_info") if info.card_data else None
        cards = cards if isinstance(cards, list) else [cards] if isinstance(cards, dict) else []
        for card in cards:
            if card.get("config_name", "default") == (need.name or "default") and card.get("dataset_size"):
                return int(card["dataset_size"])
        return sum(s.size or 0 for s in info.siblings or [])

    def stage_dataset(self, need: DatasetNeed, cache_dir: Path) -> tuple[Path, str | None]:
        import datasets

        kwargs = json.loads(need.kwargs)
        commit = self._dataset_info(need).sha
        kwargs["revision"] = commit
        ds = datasets.load_dataset(need.path, need.name, cache_dir=str(cache_dir), **kwargs)
        return _prepared_folder(ds), commit

    def text_loader(self):
        return None  # alloc-moe download's own Hub load at the pinned revision


class MirrorSource:
    """A local folder laid out like the hub (an internal mirror; the tests' stand-in for the Hub):

    - `models/<org>/<name>/`: a checkpoint's files (one revision; its commit is a hash of the file names and contents,
      so a revision pinned to another commit is not found);
    - `datasets/<org>/<name>/`: a dataset repository as on the hub (data files, README.md with a `configs:` header),
      prepared with `datasets.load_dataset(folder, name)` and filed under the hub id's cache name;
    - `text/<source>_<split>.<ext>`: one split of a text source (`download.LOCAL_BUILDERS` types) standing for the
      pinned revision of `data.SOURCES`.
    """

    def __init__(self, root: str | Path, progress: bool = True):
        self.root = Path(root).absolute()
        self.label = f"mirror {self.root}"
        if not self.root.is_dir():
            raise AllocMoeError(f"mirror {str(self.root)!r} is not a folder")

    def _repo(self, kind: str, repo: str) -> Path:
        folder = self.root / kind / repo
        if not folder.is_dir():
            raise AllocMoeError(f"{repo} is not in the mirror ({folder} not found)")
        return folder

    @staticmethod
    def _commit(folder: Path) -> str:
        h = hashlib.sha1()
        for p in sorted(q for q in folder.rglob("*") if q.is_file()):
            h.update(f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n".encode())
        return h.hexdigest()

    def resolve_model(self, repo: str, revision: str) -> str:
        commit = self._commit(self._repo("models", repo))
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision != commit:
            raise AllocMoeError(f"revision {revision} of {repo} is not in the mirror (it holds {commit})")
        return commit

    def model_bytes(self, need: ModelNeed) -> int:
        return sum(p.stat().st_size for p in self._repo("models", need.repo).rglob("*") if p.is_file())

    def stage_model(self, need: ModelNeed, hub_dir: Path) -> Path:
        """Write the checkpoint as huggingface_hub lays out a cache (blobs by sha256, snapshot symlinks, a ref for a
        branch revision), assembled in a temporary folder and renamed into place."""
        src, commit = self._repo("models", need.repo), self.resolve_model(need.repo, need.revision)
        repo_dir = hub_dir / f"models--{need.repo.replace('/', '--')}"
        repo_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".stage.", dir=repo_dir))
        try:
            snap = tmp / "snapshot"
            for p in sorted(q for q in src.rglob("*") if q.is_file()):
                rel, digest = p.relative_to(src), sha256_file(p)
                blob = repo_dir / "blobs" / digest
                if not blob.exists():
                    blob.parent.mkdir(exist_ok=True)
                    shutil.copyfile(p, tmp / digest)
                    os.replace(tmp / digest, blob)
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(blob, (repo_dir / "snapshots" / commit / rel).parent), snap / rel)
            final = repo_dir / "snapshots" / commit
            final.parent.mkdir(exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(snap, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if need.revision != commit:
            atomic_write_text(repo_dir / "refs" / need.revision, commit)
        return final

    def dataset_bytes(self, need: DatasetNeed) -> int:
        return sum(p.stat().st_size for p in self._repo("datasets", need.path).rglob("*") if p.is_file())

    def stage_dataset(self, need: DatasetNeed, cache_dir: Path) -> tuple[Path, str | None]:
        """`datasets.load_dataset(<mirror folder>, name)` into a temporary cache, then the prepared folder renamed to
        where `load_dataset(<hub id>, name)` keeps it (`dataset_cache_name`)."""
        import datasets

        src = self._repo("datasets", need.path)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".stage.", dir=cache_dir))
        try:
            ds = datasets.load_dataset(str(src), need.name, cache_dir=str(tmp), **json.loads(need.kwargs))
            prepared = _prepared_folder(ds)
            final = cache_dir / dataset_cache_name(need.path) / prepared.relative_to(tmp / _snake(src.name))
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(prepared, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final, self._commit(src)

    def text_loader(self):
        def load(source: str, split: str):
            from .download import _builder, _load

            files = sorted(self.root.glob(f"text/{source}_{split}.*"))
            if not files:
                raise AllocMoeError(f"the mirror has no text/{source}_{split}.* file")
            _builder(files[0])
            return _load(source, split, files[0])

        return load


# ---- staging ------------------------------------------------------------------------------------------------------
def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def estimate(source, need) -> int:
    """Bytes an item adds to the stage (about)."""
    if isinstance(need, ModelNeed):
        return source.model_bytes(need)
    if isinstance(need, DatasetNeed):
        return source.dataset_bytes(need)
    return int(need.max_chars * 1.2) if need.max_chars else 0  # JSON-quoted text; without a cut: not counted


def _sizes(source, pending: list) -> dict[str, int]:
    """Estimated bytes per pending item (0 where the source cannot say: that item fails when staged); fails with one
    line when the source answers for no checkpoint or dataset at all (no network, say)."""
    sizes, errors = {}, []
    for n in pending:
        try:
            sizes[n.key] = estimate(source, n)
        except Exception as e:  # noqa: BLE001 - the item itself will report it when staged
            sizes[n.key] = 0
            errors.append((n, _first_line(e)))
    remote = [n for n in pending if not isinstance(n, TextNeed)]
    if remote and len(errors) == len(remote):
        raise AllocMoeError(f"cannot reach {source.label} for any of the {len(remote)} checkpoint(s)/dataset(s) to "
                            f"stage (first: {errors[0][0].describe()}: {errors[0][1]}); nothing was staged")
    return sizes


def check_space(root: Path, source, pending: list) -> int:
    """The estimated size of the pending items; fails with one line when the stage's file system has less free."""
    sizes = _sizes(source, pending)
    total, free = sum(sizes.values()), free_bytes(root)
    if total * SPACE_MARGIN > free:
        big = max(pending, key=lambda n: sizes[n.key])
        raise AllocMoeError(f"not enough disk space in {str(root)!r}: the {len(pending)} item(s) left need about "
                            f"{_gb(total)} ({big.describe()} alone {_gb(sizes[big.key])}), {_gb(free)} are free; free "
                            "space or stage into another --out")
    return total


def _stage_one(root: Path, source, need) -> tuple[str, dict]:
    """Fetch one item into the stage; (manifest section, entry)."""
    if isinstance(need, ModelNeed):
        snapshot = source.stage_model(need, root / "hub")
        return "models", {"repo": need.repo, "revision": need.revision, "commit": snapshot.name,
                          "snapshot": snapshot.relative_to(root).as_posix(), "files": file_records(snapshot),
                          "from": source.label, "users": list(need.users)}
    if isinstance(need, DatasetNeed):
        folder, commit = source.stage_dataset(need, root / "datasets")
        return "datasets", {"path": need.path, "name": need.name, "kwargs": json.loads(need.kwargs),
                            "streaming": need.streaming, "commit": commit, "cache": folder.relative_to(root).as_posix(),
                            "files": file_records(folder), "tasks": list(need.tasks), "from": source.label}
    from .download import download

    out = staged_path(root, need.source, need.split, need.max_chars)
    meta, _ = download(need.source, out, split=need.split, max_chars=need.max_chars, loader=source.text_loader())
    return "text", {"source": need.source, "split": need.split, "max_chars": need.max_chars,
                    "revision": meta["revision"], "rows": meta["rows"], "chars": meta["chars"],
                    "files": file_records(out.parent, [out.name, meta_path(out).name]), "from": source.label}


def stage(config: dict, out: str | Path, source, *, progress: bool = True) -> dict:
    """Stage everything `config` downloads into `out` (see the module docstring); complete items are skipped. Returns
    {"needs", "staged", "skipped", "bytes"}; fails with one line when items could not be staged (the others are)."""
    root = Path(out).absolute()
    want = needs(config)
    manifest = read_manifest(root) if (root / MANIFEST).is_file() else empty_manifest()
    pending = [n for n in want.items() if problem(root, manifest, n) is not None]
    done = len(want.items()) - len(pending)
    _say(progress, f"stage {root}: {want.summary()}; {done} already complete, {len(pending)} to fetch from "
                   f"{source.label}")
    total = check_space(root, source, pending) if pending else 0
    root.mkdir(parents=True, exist_ok=True)
    known = manifest.get("tasks", {}) if manifest.get("lm_eval") == lm_eval_version() else {}  # else stale
    manifest["lm_eval"], manifest["tasks"] = lm_eval_version(), {**known, **want.tasks}
    write_manifest(root, manifest)
    failed = []
    for i, need in enumerate(pending, 1):
        _say(progress, f"[{i}/{len(pending)}] {need.describe()} ...")
        t0 = time.perf_counter()
        try:
            section, entry = _stage_one(root, source, need)
        except Exception as e:  # noqa: BLE001 - one item's failure (network, hub, format) must not lose the others
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # nothing else will fit either
                raise AllocMoeError(f"the disk of {str(root)!r} is full while staging {need.describe()}; free space "
                                    "and run again (complete items are kept)") from None
            failed.append((need, _first_line(e)))
            _say(progress, f"    failed: {_first_line(e)}")
            continue
        manifest[section][need.key] = entry
        write_manifest(root, manifest)
        size = sum(r["bytes"] for r in entry["files"].values())
        _say(progress, f"    ok: {_gb(size)} in {time.perf_counter() - t0:.1f} s")
    if failed:
        what = "; ".join(f"{n.describe()}: {why}" for n, why in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise AllocMoeError(f"staged {len(pending) - len(failed)} of {len(pending)} pending item(s) into {root}; "
                            f"{len(failed)} failed: {what}{more}; run again to retry them (complete items are skipped)")
    return {"needs": want, "staged": len(pending), "skipped": done, "bytes": total}


# ---- checking and using a stage -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
    """A checked stage directory."""

    root: Path
    manifest: dict
    needs: Needs

    def model_dir(self, repo: str, revision: str | None) -> str:
        """The staged snapshot folder of repo@revision (default main)."""
        entry = model_entry(self.manifest, repo, revision or "main")
        if entry is None:
            raise AllocMoeError(f"checkpoint {repo}@{revision or 'main'} is not in the stage {self.root}")
        return str(self.root / entry["snapshot"])


def check(config: dict, stage_dir: str | Path, *, verify: bool = False) -> Stage:
    """The stage, when it holds everything `config` needs; else one line naming what is missing."""
    root = Path(stage_dir).absolute()
    manifest = read_manifest(root)
    want = needs(config, manifest)
    missing = [(n, why) for n in want.items() if (why := problem(root, manifest, n, verify=verify)) is not None]
    if missing:
        shown = "; ".join(f"{n.describe()}: {why}" for n, why in missing[:3])
        more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise AllocMoeError(f"the stage {str(root)!r} lacks {len(missing)} of the {len(want.items())} items the config "
                            f"needs: {shown}{more}; stage them where the Hub is reachable: alloc-moe stage "
                            f"--configfile CONFIG --out {root}")
    return Stage(root, manifest, want)


def offline_env(stage_dir: str | Path) -> dict[str, str]:
    """Environment for jobs that run from a stage: the hub and datasets caches point into it, both are offline, and
    `alloc-moe download` copies staged text (ALLOC_MOE_STAGE_DIR)."""
    from .download import STAGE_ENV

    root = Path(stage_dir).absolute()
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_CACHE": str(root / "hub"), "HF_DATASETS_CACHE": str(root / "datasets"), STAGE_ENV: str(root)}


def resolve(config: dict, source) -> str:
    """A config file (YAML) pinning every hub checkpoint of `config` to the commit its revision points to now."""
    lines = [f"# alloc-moe stage --resolve ({source.label}): the commits the checkpoints' revisions point to now.",
             "# Pass this file after the others (--configfile config/paper.yaml pins.yaml) or copy the revisions in.",
             "models:"]
    for need in model_needs(config):
        try:
            commit = source.resolve_model(need.repo, need.revision)
        except AllocMoeError:
            raise
        except Exception as e:  # noqa: BLE001 - network or hub failure: one line
            raise AllocMoeError(f"cannot resolve {need.key} on {source.label} ({_first_line(e)})") from None
        lines += [f"  {user}: {{revision: {commit}}}  # {need.key}" for user in need.users]
    if len(lines) == 3:
        lines[-1] = "models: {}  # the config has no hub checkpoints"
    return "\n".join(lines) + "\n"


# ---- command line -------------------------------------------------------------------------------------------------
def register_cli(sub) -> None:
    p = sub.add_parser(
        "stage", help="stage a config's checkpoints, lm-eval datasets and calibration text into one folder for "
                      "offline runs (or --check one, or --resolve revisions)",
        description="Stage everything the workflow configs download (hub checkpoints at their revisions, the "
                    "datasets of their lm-eval tasks, the calibration/evaluation text) into one folder with a "
                    "manifest (stage.json); a re-run skips what is complete. Run the workflow from it offline with "
                    "--config offline='{stage_dir: DIR}'.")
    p.add_argument("--configfile", nargs="+", required=True, metavar="FILE",
                   help="workflow config files, merged in order like snakemake --configfile")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", metavar="DIR", help="stage into this folder (created; resumed when it exists)")
    mode.add_argument("--check", metavar="DIR", help="check that this stage holds everything the configs need")
    mode.add_argument("--resolve", action="store_true",
                      help="print a config file that pins every checkpoint revision to its current commit")
    p.add_argument("--verify", action="store_true", help="with --check: recompute every file's sha256 (slow)")
    p.add_argument("--mirror", metavar="DIR", help="fetch from a local folder laid out like the hub "
                                                   "(models/, datasets/, text/; see alloc_moe.data.stage.MirrorSource)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_stage)


def _source(args):
    progress = not args.no_progress
    return MirrorSource(args.mirror, progress) if args.mirror else HubSource(progress)


def _cmd_stage(args) -> int:
    config = load_config(args.configfile)
    if args.check:
        st = check(config, args.check, verify=args.verify)
        print(f"{st.root} holds everything {' + '.join(args.configfile)} needs: {st.needs.summary()}"
              f"{' (sha256 verified)' if args.verify else ''}")
    elif args.resolve:
        print(resolve(config, _source(args)), end="")
    else:
        res = stage(config, args.out, _source(args), progress=not args.no_progress)
        print(f"staged {Path(args.out).absolute()}: {res['needs'].summary()}; {res['staged']} fetched (about "
              f"{_gb(res['bytes'])}), {res['skipped']} already complete; manifest {MANIFEST}")
    return 0
