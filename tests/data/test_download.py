"""`alloc-moe download`: hub text sources into checksummed calibration JSONL, a local copy instead of the hub, the
offline failure. Everything goes through the real `datasets.load_dataset` (local files with its json / parquet /
text builders; the hub in offline mode)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from alloc_moe.data.download import download, meta_path
from alloc_moe.data.text import SOURCES, load_calibration
from alloc_moe.errors import AllocMoeError
from alloc_moe.io import sha256_file

ROWS = [" = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", " He appeared in 2000 . \n"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes its Arrow cache under the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _jsonl(path: Path, rows=ROWS, field="text") -> Path:
    path.write_text("".join(json.dumps({field: r, "id": i}) + "\n" for i, r in enumerate(rows)))
    return path


def test_local_copy_writes_the_calibration_jsonl_and_a_checksummed_sidecar(tmp_path):
    out = tmp_path / "data" / "wikitext2_test.jsonl"
    meta, cached = download("wikitext2", out, local=_jsonl(tmp_path / "test.jsonl"))
    assert not cached
    lines = out.read_text().splitlines()
    # the synthetic calibration sets' format: {"family", "text"} per row, rows in order, empty rows kept
    assert [json.loads(line) for line in lines] == [{"family": "wikitext2", "text": r} for r in ROWS]
    assert all(line.startswith('{"family": "wikitext2", "text": ') for line in lines)
    side = json.loads(meta_path(out).read_text())
    assert meta_path(out) == tmp_path / "data" / "wikitext2_test.meta.json"
    assert side == meta
    assert side["sha256"] == sha256_file(out) and side["local_sha256"] == sha256_file(tmp_path / "test.jsonl")
    assert (side["source"], side["split"], side["rows"], side["chars"]) == ("wikitext2", "test", 4, sum(map(len, ROWS)))
    # what profiling and perplexity read: documents of family "wikitext2", the same rows
    docs = load_calibration(str(out))
    assert [d.text for d in docs] == ROWS and {d.family for d in docs} == {"wikitext2"}


def test_parquet_text_and_compressed_json_copies(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ROWS}), tmp_path / "test.parquet")
    (tmp_path / "val.txt").write_text("first line\nsecond line\n")
    with gzip.open(tmp_path / "c4-validation.json.gz", "wt") as f:
        f.write("".join(json.dumps({"text": r, "url": "u"}) + "\n" for r in ["a c4 page", "another page"]))
    download("wikitext2", tmp_path / "p.jsonl", local=tmp_path / "test.parquet")
    assert [d.text for d in load_calibration(str(tmp_path / "p.jsonl"))] == ROWS
    download("pile", tmp_path / "t.jsonl", split="validation", local=tmp_path / "val.txt")
    assert [d.text for d in load_calibration(str(tmp_path / "t.jsonl"))] == ["first line", "second line"]
    meta, _ = download("c4", tmp_path / "c.jsonl", local=tmp_path / "c4-validation.json.gz")
    assert meta["split"] == SOURCES["c4"].split == "validation"
    assert [d.text for d in load_calibration(str(tmp_path / "c.jsonl"))] == ["a c4 page", "another page"]


def test_rerun_verifies_the_cache_and_catches_a_corrupted_file(tmp_path):
    local, out = _jsonl(tmp_path / "test.jsonl"), tmp_path / "w.jsonl"
    first, _ = download("wikitext2", out, local=local)
    stamp = out.stat().st_mtime_ns
    again, cached = download("wikitext2", out, local=local)
    assert cached and again == first and out.stat().st_mtime_ns == stamp  # answered by the cache, not rewritten

    out.write_text(out.read_text().replace("actor", "actress"))  # one changed word
    with pytest.raises(AllocMoeError, match=r"w\.jsonl' is corrupted: its sha256 is .*delete it"):
        download("wikitext2", out, local=local)
    assert "actress" in out.read_text()  # left as it is for inspection, not silently replaced
    _, cached = download("wikitext2", out, local=local, force=True)
    assert not cached and sha256_file(out) == first["sha256"]


def test_a_different_request_loads_again(tmp_path):
    local, out = _jsonl(tmp_path / "test.jsonl"), tmp_path / "w.jsonl"
    download("wikitext2", out, local=local)
    meta, cached = download("wikitext2", out, local=local, max_chars=30)
    assert not cached and meta["max_chars"] == 30 and meta["chars"] == 30
    assert [d.text for d in load_calibration(str(out))] == [ROWS[0], "", ROWS[2][: 30 - len(ROWS[0])]]
    _jsonl(local, ROWS[:1])  # the local copy changed: its sha256 is part of the request
    meta, cached = download("wikitext2", out, local=local, max_chars=30)
    assert not cached and meta["rows"] == 1


@pytest.mark.parametrize("case, match", [
    ("no_text_column", r"has no 'text' column \(columns: body, id\)"),
    ("empty", r"holds no text"),
    ("bad_suffix", r"unsupported file type; allowed endings: \.parquet, \.json"),
    ("missing", r"local copy of wikitext2 not found"),
    ("bad_out", r"--out must end in \.jsonl"),
    ("unknown", r"unknown dataset 'wikitext3'; allowed: wikitext2, c4, pile"),
])
def test_bad_input_is_one_error_and_writes_nothing(tmp_path, case, match):
    local = {"no_text_column": lambda p: _jsonl(p / "x.jsonl", field="body"),
             "empty": lambda p: _jsonl(p / "x.jsonl", rows=["", ""]),
             "bad_suffix": lambda p: _jsonl(p / "x.docx"),
             "missing": lambda p: p / "nope.jsonl"}.get(case, lambda p: _jsonl(p / "x.jsonl"))(tmp_path)
    out = tmp_path / "out" / ("w.txt" if case == "bad_out" else "w.jsonl")
    with pytest.raises(AllocMoeError, match=match):
        download("wikitext3" if case == "unknown" else "wikitext2", out, local=local)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _cli(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "alloc_moe", "download", *args], check=False, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**os.environ, "HF_HOME": str(tmp_path / "hf"), **env})


def test_offline_hub_fails_with_one_line_naming_the_config_key(tmp_path):
    res = _cli(tmp_path, "--dataset", "wikitext2", "--out", "data/wikitext2_test.jsonl", HF_DATASETS_OFFLINE="1")
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    rev = SOURCES["wikitext2"].revision[:12]
    assert res.stderr.startswith(f"alloc-moe download: error: cannot fetch wikitext2 (Salesforce/wikitext@{rev} "
                                 "split 'test') from the Hugging Face Hub (ConnectionError: ")
    assert "config key download.local.wikitext2_test (alloc-moe download --local FILE" in res.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # no partial output


def test_cli_local_copy_then_verified_cache(tmp_path):
    _jsonl(tmp_path / "test.jsonl")
    args = ["--dataset", "wikitext2", "--local", "test.jsonl", "--out", "w.jsonl"]
    first = _cli(tmp_path, *args, HF_DATASETS_OFFLINE="1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("wrote w.jsonl: 4 rows, ")
    second = _cli(tmp_path, *args, HF_DATASETS_OFFLINE="1")
    assert second.returncode == 0 and second.stdout.startswith("verified cached w.jsonl: 4 rows"), second.stderr
