"""`alloc-moe stage` and offline runs from a stage, with a local folder laid out like the hub standing in for it
(`stage.MirrorSource`): tiny zoo checkpoints, tiny dataset repositories, tiny text splits.

Staging goes through the mirror; everything after it is real: with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 the
project's loading code reads the staged hub cache, lm-eval reads the staged datasets cache through
`datasets.load_dataset(<hub id>, <name>)`, and the workflow runs a download and an accuracy job from the stage. Without
the stage the same run fails with the project's one-line error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

datasets = pytest.importorskip("datasets")

from alloc_moe.backends.hf.loading import split_ref
from alloc_moe.data import stage as st
from alloc_moe.errors import AllocMoeError
from alloc_moe.io import sha256_file

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
REPO = "fakeorg/TinyMoE"
TEXT = [f" = Section {i} = \n line {i} of the stand-in WikiText . \n" for i in range(120)]
TASK = """task: tiny_qa
dataset_path: fakeorg/TinyQA
dataset_name: cfg
output_type: multiple_choice
test_split: test
doc_to_text: "{{q}} Answer:"
doc_to_target: "{{a}}"
doc_to_choice: [" yes", " no"]
metric_list:
  - metric: acc
metadata: {group: NLU}
"""
# a task that streams its data from the hub, as GroundCocoa does
STREAM_TASK = TASK.replace("tiny_qa", "stream_qa").replace("fakeorg/TinyQA", "fakeorg/StreamQA").replace(
    "dataset_name: cfg\n", "dataset_kwargs: {streaming: true}\n")


def _dataset_repo(folder: Path, configs: dict[str | None, list[dict]]) -> None:
    """A dataset repository as on the hub: one test split per config (README `configs:`), or data files alone."""
    folder.mkdir(parents=True, exist_ok=True)
    if list(configs) == [None]:
        (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in configs[None]))
        return
    card = ["---", "configs:"]
    for name, rows in configs.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        card += [f"- config_name: {name}", "  data_files:", "  - split: test", f"    path: {name}/test.jsonl"]
    (folder / "README.md").write_text("\n".join([*card, "---", ""]))


def _text(mirror: Path, key: str, rows=TEXT) -> None:
    (mirror / "text").mkdir(parents=True, exist_ok=True)
    (mirror / "text" / f"{key}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A mirror with a tiny checkpoint, two dataset repositories and a WikiText split; the task folders and the config
    that uses them."""
    from alloc_moe.data import zoo

    d = tmp_path_factory.mktemp("stage")
    mirror = d / "mirror"
    zoo.write_model(mirror / "models" / REPO, arch="olmoe", layers=2, seed=0)
    qa = [{"q": f"Is {i} odd?", "a": i % 2} for i in range(6)]
    _dataset_repo(mirror / "datasets/fakeorg/TinyQA", {"cfg": qa})
    _dataset_repo(mirror / "datasets/fakeorg/StreamQA", {None: qa})
    _text(mirror, "wikitext2_test")
    (d / "tasks").mkdir()
    (d / "tasks/tiny_qa.yaml").write_text(TASK)
    (d / "stream").mkdir()
    (d / "stream/stream_qa.yaml").write_text(STREAM_TASK)
    config = {"models": {"tiny": {"path": REPO, "revision": "main", "budgets": [2], "backend": "hf",
                                  "tasks": f"{d / 'tasks'},{d / 'stream/stream_qa.yaml'}"}},
              "calibration": {"default": "wikitext2", "sets": ["wikitext2"]},
              "evaluation": {"text": "results/data/wikitext2_test.jsonl", "seq_len": 16},
              "download": {"max_chars": 2000}}
    (d / "tiny.yaml").write_text(yaml.safe_dump(config))
    res = st.stage(config, d / "st", st.MirrorSource(mirror), progress=False)
    assert res["staged"] == 4 and res["skipped"] == 0
    return d, mirror, config


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def test_stage_holds_a_hub_cache_a_datasets_cache_the_text_and_a_manifest(hub):
    d, mirror, config = hub
    root = d / "st"
    manifest = json.loads((root / "stage.json").read_text())
    model = manifest["models"][f"{REPO}@main"]
    snap = root / model["snapshot"]
    # the layout huggingface_hub writes: snapshots/<commit>/ of symlinks into blobs/, refs/main naming the commit
    assert snap.parent == root / "hub/models--fakeorg--TinyMoE/snapshots" and snap.name == model["commit"]
    assert (root / "hub/models--fakeorg--TinyMoE/refs/main").read_text() == model["commit"]
    assert (snap / "model.safetensors").is_symlink()
    src = mirror / "models" / REPO
    assert model["files"] == {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                              for p in sorted(src.iterdir())}
    # datasets: filed where load_dataset(<hub id>, <name>) looks, the streaming one prepared in full
    qa = manifest["datasets"]["fakeorg/TinyQA:cfg"]
    assert qa["cache"].startswith("datasets/fakeorg___tiny_qa/cfg/0.0.0/") and qa["tasks"] == ["tiny_qa"]
    assert set(qa["files"]) == {"dataset_info.json", "tiny_qa-test.arrow"} and not qa["streaming"]
    assert manifest["datasets"]["fakeorg/StreamQA"]["streaming"]
    assert manifest["tasks"] == {"tiny_qa": ["fakeorg/TinyQA:cfg"], "stream_qa": ["fakeorg/StreamQA"]}
    # text: the JSONL and sidecar the download rule writes, at the pinned revision, cut at download.max_chars
    text = manifest["text"]["wikitext2_test.max2000"]
    side = json.loads((root / "text/wikitext2_test.max2000.meta.json").read_text())
    assert side["revision"] == text["revision"] == st.SOURCES["wikitext2"].revision
    assert side["chars"] == 2000 and side["max_chars"] == 2000 and "local_file" not in side
    # the whole stage is checked, and --verify recomputes the checksums
    assert st.check(config, root, verify=True).model_dir(REPO, "main") == str(snap)


def test_rerun_skips_what_is_complete_and_restages_what_is_damaged(hub):
    d, mirror, config = hub
    root = d / "again"
    shutil.copytree(d / "st", root, symlinks=True)
    before = _tree(root)
    res = st.stage(config, root, st.MirrorSource(mirror), progress=False)
    assert (res["staged"], res["skipped"]) == (0, 4) and _tree(root) == before  # nothing fetched, same bytes
    # a damaged arrow file (other size) and a lost text file are found and fetched again; the rest is kept
    arrow = next((root / "datasets/fakeorg___tiny_qa").rglob("*.arrow"))
    arrow.write_bytes(b"damaged")
    (root / "text/wikitext2_test.max2000.jsonl").unlink()
    with pytest.raises(AllocMoeError, match=r"lacks 2 of the 4 items the config needs: text wikitext2 split test "
                                            r"\(first 2000 characters\): wikitext2_test\.max2000\.jsonl is missing; "
                                            r"dataset fakeorg/TinyQA:cfg \(task tiny_qa\): tiny_qa-test\.arrow has 7 "
                                            r"bytes, the manifest records \d+; stage them where the Hub is reachable"):
        st.check(config, root)
    res = st.stage(config, root, st.MirrorSource(mirror), progress=False)
    assert (res["staged"], res["skipped"]) == (2, 2) and _tree(root) == before  # byte for byte what it was


def test_check_and_its_cli_name_what_is_missing_in_one_line(hub, tmp_path):
    d, _, config = hub
    more = {**config, "models": {**config["models"], "other": {"path": "fakeorg/Other", "budgets": [2]}}}
    with pytest.raises(AllocMoeError, match=r"lacks 1 of the 5 items the config needs: checkpoint fakeorg/Other@main: "
                                            r"not staged;"):
        st.check(more, d / "st")
    (tmp_path / "more.yaml").write_text(yaml.safe_dump({"models": {"other": more["models"]["other"]}}))
    res = _cli("stage", "--check", str(d / "st"), "--configfile", str(d / "tiny.yaml"), str(tmp_path / "more.yaml"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"alloc-moe stage: error: the stage '{d / 'st'}' lacks 1 of the 5 items")
    with pytest.raises(AllocMoeError, match=r"is not a stage directory \(no stage\.json\)"):
        st.check(config, tmp_path)


def test_download_copies_the_staged_text_and_its_sidecar(hub, tmp_path):
    """What the `download` rule does with a stage: the bytes and the sidecar an online download writes (the pinned
    revision, not a local file), checksum verified; a split staged with another cut is not taken."""
    from alloc_moe.data.download import download, meta_path

    d, _, _ = hub
    staged = d / "st/text/wikitext2_test.max2000.jsonl"
    meta, cached = download("wikitext2", tmp_path / "w.jsonl", max_chars=2000, stage=d / "st")
    assert not cached and (tmp_path / "w.jsonl").read_bytes() == staged.read_bytes()
    assert meta["revision"] == st.SOURCES["wikitext2"].revision and meta["chars"] == 2000
    assert meta_path(tmp_path / "w.jsonl").read_bytes() == meta_path(staged).read_bytes()
    with pytest.raises(AllocMoeError, match=r"the stage '.*' holds no wikitext2 split 'test' cut at 3000 characters at "
                                            r"revision b08601e04326 \(wikitext2_test\.max3000\.jsonl with its sidecar\); "
                                            r"stage it where the Hub is reachable: alloc-moe stage"):
        download("wikitext2", tmp_path / "x.jsonl", max_chars=3000, stage=d / "st")
    assert not (tmp_path / "x.jsonl").exists()


def test_eval_names_task_data_it_cannot_load_in_one_line(monkeypatch):
    """lm-eval's dataset load failing offline (not staged) is the project's one-line error, not a traceback."""
    from alloc_moe.stages import accuracy

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    task = yaml.safe_load(TASK) | {"task": "missing_qa", "dataset_path": "fakeorg/NotStaged"}
    with pytest.raises(AllocMoeError, match=r"cannot load the data of the lm-eval tasks \(ConnectionError: Couldn't "
                                            r"reach 'fakeorg/NotStaged' on the Hub .*\); offline, stage the datasets"):
        accuracy._task_manager(None, False).load([task])


def test_disk_space_is_checked_before_anything_is_fetched(hub, tmp_path, monkeypatch):
    _, mirror, config = hub
    monkeypatch.setattr(st, "free_bytes", lambda path: 1000)
    with pytest.raises(AllocMoeError, match=r"not enough disk space in '.*': the 4 item\(s\) left need about .* "
                                            r"\(checkpoint fakeorg/TinyMoE@main alone .*\), 1\.0 kB are free"):
        st.stage(config, tmp_path / "full", st.MirrorSource(mirror), progress=False)
    assert not (tmp_path / "full").exists()


def test_revisions_resolve_pin_and_mismatch(hub, tmp_path):
    d, mirror, config = hub
    commit = json.loads((d / "st/stage.json").read_text())["models"][f"{REPO}@main"]["commit"]
    pins = st.resolve(config, st.MirrorSource(mirror))
    assert f"  tiny: {{revision: {commit}}}  # {REPO}@main" in pins
    pinned = st._merge(config, yaml.safe_load(pins))  # passed as a further --configfile
    assert pinned["models"]["tiny"]["revision"] == commit
    assert st.check(pinned, d / "st").model_dir(REPO, commit).endswith(commit)  # the stage of `main` serves the pin
    other = "0" * 40
    with pytest.raises(AllocMoeError, match=f"revision {other} of {REPO} is not in the mirror"):
        st.stage(st._merge(config, {"models": {"tiny": {"revision": other}}}), tmp_path / "x", st.MirrorSource(mirror),
                 progress=False)
    with pytest.raises(AllocMoeError, match=r"models\.tiny\.revision: the model's path '/m' is not a hub id"):
        st.model_needs({"models": {"tiny": {"path": "/m", "revision": "main", "budgets": [1]}}})
    assert split_ref(f"{REPO}@{commit}") == (REPO, commit) and split_ref(REPO) == (REPO, None)
    assert split_ref(str(d)) == (str(d), None)
    with pytest.raises(AllocMoeError, match="empty or padded revision"):
        split_ref(f"{REPO}@")


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "alloc_moe", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=cwd, check=False)


LOADS = """
import datasets, json, sys
from alloc_moe.errors import AllocMoeError
from alloc_moe.backends.hf.loading import load_model, resolved_commit
from alloc_moe.backends.hf.model import config_moe_layers
commit = sys.argv[1]
for ref in ["fakeorg/TinyMoE@main", f"fakeorg/TinyMoE@{commit}"]:
    model, tok = load_model(ref, device="cpu")
    assert model.config.num_hidden_layers == 2 and tok("ab")["input_ids"] == [97, 98]
    assert resolved_commit(ref) == commit and len(config_moe_layers(ref)) == 2
assert datasets.load_dataset("fakeorg/TinyQA", "cfg")["test"][1] == {"q": "Is 1 odd?", "a": 1}
rows = list(datasets.load_dataset("fakeorg/StreamQA", streaming=True)["test"])  # what GroundCocoa's task does
assert len(rows) == 6 and rows[0] == {"q": "Is 0 odd?", "a": 0}
assert config_moe_layers("fakeorg/TinyMoE@v2") is None  # a revision that is not staged: unreadable here
from alloc_moe.harness.manifest import checkpoints  # what the run manifest records for an unpinned revision
ckpt = checkpoints({"models": {"tiny": {"path": "fakeorg/TinyMoE", "revision": "main"}, "local": {"path": "."}}})
assert ckpt == {"tiny": {"path": "fakeorg/TinyMoE", "revision": "main", "commit": commit}}, ckpt
try:
    load_model("fakeorg/TinyMoE@v2")
except AllocMoeError as e:
    print(e)
"""


@pytest.mark.slow
def test_offline_loads_read_the_staged_caches(hub):
    """The project's loaders (hub id at a branch or a commit), config reading, the commit the run manifest records,
    and `datasets` as lm-eval calls it, with the hub off and the caches pointing into the stage."""
    d, _, _ = hub
    commit = json.loads((d / "st/stage.json").read_text())["models"][f"{REPO}@main"]["commit"]
    res = subprocess.run([sys.executable, "-c", LOADS, commit], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **st.offline_env(d / "st")}, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("cannot load model 'fakeorg/TinyMoE@v2': ") and "alloc-moe stage" in res.stdout


def _snakemake(work: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    if not SNAKEMAKE.exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")
    (work / "config").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "config/config.yaml", work / "config/config.yaml")
    return subprocess.run([str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, check=False)


@pytest.mark.workflow
def test_workflow_runs_from_the_stage_offline_and_fails_without_it(hub, tmp_path):
    """A download and an accuracy job for real, offline: the text is copied from the stage, the checkpoint loads from
    its staged snapshot (its config gives the DAG the MoE layer count), lm-eval reads the staged dataset. The same run
    without the stage stops before any job with the project's one-line error."""
    d, _, config = hub
    tasks_only = {**config, "models": {"embedded": None, "tiny": {**config["models"]["tiny"], "tasks": str(d / "tasks")}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tasks_only))
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump({"offline": {"stage_dir": str(d / "st")}}))
    target = "results/tiny-s0/eval/original"
    hub_off = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    work = tmp_path / "work"
    res = _snakemake(work, "--configfile", str(tmp_path / "run.yaml"), str(tmp_path / "offline.yaml"), "--cores", "1",
                     target, env=hub_off)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    staged = d / "st/text/wikitext2_test.max2000.jsonl"
    assert (work / "results/data/wikitext2_test.jsonl").read_bytes() == staged.read_bytes()
    assert (work / "results/logs/download_wikitext2_test.log").read_text().startswith(
        "copied results/data/wikitext2_test.jsonl: ")
    result = json.loads((work / target / "original.json").read_text())
    commit = json.loads((d / "st/stage.json").read_text())["models"][f"{REPO}@main"]["commit"]
    assert result["settings"]["model"] == str(d / f"st/hub/models--fakeorg--TinyMoE/snapshots/{commit}")
    assert [(r["task"], r["model"]) for r in result["rows"]] == [("tiny_qa", "tiny")]
    assert result["perplexity"]["n_tokens"] > 0

    bare = tmp_path / "bare"
    res = _snakemake(bare, "--configfile", str(tmp_path / "run.yaml"), "--cores", "1", target, env=hub_off)
    lines = [x for x in res.stderr.splitlines() if not x.startswith("Config file config/config.yaml is extended")]
    assert res.returncode == 2 and len(lines) == 1 and not (bare / "results").exists(), res.stderr[-3000:]
    assert lines[0].startswith(f"config error: models.tiny: cannot read the model config of '{REPO}@main' (")
    assert lines[0].endswith("or run from a stage (offline.stage_dir)")


# ---- config/paper.yaml from a stage ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_stage(tmp_path_factory):
    """config/paper.yaml staged from a mirror holding a stand-in for each of its downloads: the three checkpoints
    (their config.json), a one-row repository per lm-eval dataset, and the text splits."""
    d = tmp_path_factory.mktemp("paper")
    config = st.load_config([ROOT / "config/paper.yaml"])
    want = st.needs(config)
    mirror = d / "mirror"
    for spec in config["models"].values():
        (mirror / "models" / spec["path"]).mkdir(parents=True)
        shutil.copy(ROOT / spec["hub_config"], mirror / "models" / spec["path"] / "config.json")
    repos: dict[str, dict] = {}
    for need in want.datasets:
        repos.setdefault(need.path, {})[need.name] = [{"x": 1}]
    for path, configs in repos.items():
        _dataset_repo(mirror / "datasets" / path, configs)
    for t in want.texts:
        _text(mirror, f"{t.source}_{t.split}", TEXT[:3])
    st.stage(config, d / "st", st.MirrorSource(mirror), progress=False)
    return d, config, want


@pytest.mark.slow  # the paper_stage fixture: about 20 s
def test_paper_needs_are_the_papers_downloads(paper_stage):
    _, _, want = paper_stage
    from alloc_moe.data.tasks import suite

    assert [m.key for m in want.models] == ["Qwen/Qwen1.5-MoE-A2.7B@main", "allenai/OLMoE-1B-7B-0924@main",
                                            "deepseek-ai/DeepSeek-V2-Lite@main"]
    assert sorted(want.tasks) == sorted(s.name for s in suite("paper"))
    keys = {n.key: n for n in want.datasets}
    assert len(want.tasks["mmlu"]) == 57 and "cais/mmlu:anatomy" in keys and len(want.tasks["bbh"]) == 27
    assert len(want.tasks["acp_bench"]) == 14 and keys["openai/gsm8k:main"].tasks == ("gsm8k",)
    assert keys["harsh147/GroundCocoa"].streaming and "streams from the Hub" in keys["harsh147/GroundCocoa"].describe()
    assert {(t.source, t.split, t.max_chars) for t in want.texts} == {
        ("wikitext2", "test", 4000000), ("c4", "validation", 4000000), ("pile", "validation", 4000000),
        ("wikitext2", "validation", 4000000)}


@pytest.mark.slow
def test_paper_dry_run_resolves_from_the_stage(paper_stage, tmp_path):
    """`snakemake -n` of config/paper.yaml with offline.stage_dir: the stage is checked, every job resolves, and the
    checkpoints are passed as their staged snapshot folders. One missing item stops it before any job, in one line."""
    d, _, want = paper_stage
    root = d / "st"
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump({"offline": {"stage_dir": str(root)}}))
    args = ["--configfile", str(ROOT / "config/paper.yaml"), str(tmp_path / "offline.yaml")]
    res = _snakemake(tmp_path / "work", *args, "-n", "-p", env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    manifest = json.loads((root / "stage.json").read_text())
    snap = root / manifest["models"]["deepseek-ai/DeepSeek-V2-Lite@main"]["snapshot"]
    assert f"alloc-moe eval --model {snap} --plan original " in res.stdout
    assert f"alloc-moe profile --method lexi --model {snap} " in res.stdout
    assert "deepseek-ai/DeepSeek-V2-Lite" not in res.stdout.replace(str(snap), "")  # never the hub id
    assert sum(line in ("rule download:", "localrule download:") for line in res.stdout.splitlines()) == 4

    kept = (root / "stage.json").read_bytes()
    del manifest["datasets"]["cais/mmlu:anatomy"]
    st.write_manifest(root, manifest)
    try:
        res = _snakemake(tmp_path / "work2", *args, "-n", env={"HF_HUB_OFFLINE": "1"})
    finally:
        (root / "stage.json").write_bytes(kept)
    lines = [x for x in res.stderr.splitlines() if not x.startswith("Config file config/config.yaml is extended")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"config error: offline.stage_dir: the stage '{root}' lacks 1 of the "
                               f"{len(want.items())} items the config needs: dataset cais/mmlu:anatomy (task mmlu): "
                               "not staged;")
    assert "rule " not in res.stdout and not (tmp_path / "work2/results").exists()
