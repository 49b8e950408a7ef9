"""`alloc-moe eval --resume-dir`: a multi-plan eval job that is killed and run again loses at most the plan in flight.

The real thing: an `alloc-moe eval` process with three plans is killed (SIGKILL) as soon as the first plan's
checkpoint appears; the rerun evaluates only the other two (counted at `accuracy.evaluate`, not from log lines) and
writes outputs byte-identical to an uninterrupted run. The rest runs in-process with `evaluate` replaced: a checkpoint
is reused only when everything that decides the result is unchanged; stale files are removed; the directory is
emptied once the outputs are written.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import alloc_moe.backends.hf.apply
import alloc_moe.stages.accuracy
from alloc_moe.cli import main
from alloc_moe.core.plan import build_plan
from alloc_moe.data import zoo
from alloc_moe.data.tasks import embedded
from alloc_moe.harness.resume import Checkpoints, digest, fingerprint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny DeepSeek-V2 whose experts matter (plans change scores), the embedded suite at 8 items per task, two
    plans."""
    d = tmp_path_factory.mktemp("resume")
    model = zoo.write_model(d / "model", arch="deepseek_v2", layers=3, router_std=1.0, seed=0)
    with torch.no_grad():
        for m in alloc_moe.backends.hf.apply.moe_layers(model):
            for p in m.experts.parameters():
                p.mul_(40.0)
    model.save_pretrained(d / "model")
    embedded.write_suite(d / "tasks", items={t: 8 for t in embedded.ITEMS})
    layers, k = zoo.moe_layer_indices(model), zoo.k_orig(model)
    build_plan(method="uniform", budget=len(layers), moe_layers=layers, k_orig=k, model="m").save(d / "tight.json")
    build_plan(method="uniform", budget=len(layers) * 1.5, moe_layers=layers, k_orig=k, model="m",
               token_allocation="alloc-t", k_base=1).save(d / "alloct.json")
    return d


def _args(d: Path, outs: list[Path], resume: Path | None, plans=("original", "tight.json", "alloct.json")) -> list:
    pairs = [a for p, o in zip(plans, outs) for a in ("--plan", p if p == "original" else str(d / p), "--out", str(o))]
    return ["eval", "--model", str(d / "model"), "--tasks", "embedded", "--include-path", str(d / "tasks"),
            "--batch-size", "16", "--threads", "1", *pairs, *(["--resume-dir", str(resume)] if resume else [])]


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("[0-9a-f]*.json")) if directory.is_dir() else []


@pytest.fixture
def spy(monkeypatch):
    """The plans `accuracy.evaluate` really evaluates, in order (it still runs)."""
    seen, real = [], alloc_moe.stages.accuracy.evaluate

    def counting(model, plans, *a, **k):
        seen.extend("original" if p is None else f"{p.layer_method}/{p.token_allocation}" for p in plans)
        return real(model, plans, *a, **k)

    monkeypatch.setattr(alloc_moe.stages.accuracy, "evaluate", counting)
    return seen


@pytest.mark.slow
def test_killed_eval_job_reruns_only_the_unfinished_plans(setup, tmp_path, spy):
    d = setup
    ref = [tmp_path / f"ref{i}.json" for i in range(3)]
    assert main(_args(d, ref, None)) == 0  # uninterrupted, no checkpoints
    assert spy == ["original", "uniform/topk", "uniform/alloc-t"]
    assert len({json.dumps(json.loads(r.read_text())["rows"]) for r in ref[1:]}) == 2  # the plans score differently

    outs, part = [tmp_path / f"out{i}.json" for i in range(3)], tmp_path / "part"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "alloc_moe", *_args(d, outs, part)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _checkpoints(part):
        assert proc.poll() is None, f"exited ({proc.returncode}) before a checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # as the OOM killer or a cluster's time limit would; no clean-up runs
    proc.wait(timeout=60)
    proc.stderr.close()
    assert len(_checkpoints(part)) == 1 and not any(o.exists() for o in outs)  # outputs come only at the end

    spy.clear()
    assert main(_args(d, outs, part)) == 0
    assert spy == ["uniform/topk", "uniform/alloc-t"]  # the original was not evaluated again
    assert [o.read_bytes() for o in outs] == [r.read_bytes() for r in ref]
    assert not part.exists()  # emptied once the outputs are written


# ---- in-process, `evaluate` replaced ---------------------------------------------------------------------------

class _Killed(BaseException):
    """Stands for a kill in the middle of a plan (nothing after it runs)."""


def _fake_evaluate(calls: list, kill_at: int | None = None):
    def evaluate(model, plans, tasks, **kw):
        (plan,) = plans
        if len(calls) == kill_at:
            raise _Killed
        name = "original" if plan is None else plan.token_allocation
        calls.append(name)
        row = {"layer_method": name, "token_allocation": "topk", "budget": 1.0}
        return [{"rows": [row], "groups": [], "limit": kw["limit"]}]
    return evaluate


def _killed_after_first_plan(d, tmp_path, monkeypatch, *extra) -> Path:
    part = tmp_path / "part"
    calls = []
    monkeypatch.setattr(alloc_moe.stages.accuracy, "evaluate", _fake_evaluate(calls, kill_at=1))
    with pytest.raises(_Killed):
        main(_args(d, [tmp_path / f"o{i}.json" for i in range(3)], part) + list(extra))
    assert calls == ["original"] and len(_checkpoints(part)) == 1
    return part


def _rerun(d, tmp_path, monkeypatch, *extra) -> list:
    calls = []
    monkeypatch.setattr(alloc_moe.stages.accuracy, "evaluate", _fake_evaluate(calls))
    assert main(_args(d, [tmp_path / f"o{i}.json" for i in range(3)], tmp_path / "part") + list(extra)) == 0
    return calls


def test_matching_checkpoint_is_reused(setup, tmp_path, monkeypatch, capsys):
    _killed_after_first_plan(setup, tmp_path, monkeypatch)
    capsys.readouterr()
    assert _rerun(setup, tmp_path, monkeypatch) == ["topk", "alloc-t"]
    out = capsys.readouterr().out
    assert "plan original: reused its checkpoint" in out and "plan original: evaluating" not in out


@pytest.mark.parametrize("change", ["other --limit", "other --seed", "model file rewritten", "task data changed",
                                    "other code", "checkpoint holds another key"])
def test_a_checkpoint_of_anything_else_is_never_reused(setup, tmp_path, monkeypatch, change):
    d = tmp_path / "copy"  # a private copy: some changes rewrite files
    import shutil

    shutil.copytree(setup, d)
    part = _killed_after_first_plan(d, tmp_path, monkeypatch, "--limit", "5")
    extra = ["--limit", "5"]
    if change == "other --limit":
        extra = ["--limit", "6"]
    elif change == "other --seed":
        extra += ["--seed", "1"]
    elif change == "model file rewritten":
        cfg = d / "model" / "config.json"
        cfg.write_text(cfg.read_text())  # same bytes, new file: a retrained model in the same folder
        os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    elif change == "task data changed":
        data = next((d / "tasks").glob("*.jsonl"))
        data.write_text(data.read_text().replace("1", "2", 1))
    elif change == "other code":
        monkeypatch.setattr("alloc_moe.harness.codehash.code_hash", lambda *a, **k: "0" * 64)
    elif change == "checkpoint holds another key":
        (ckpt,) = _checkpoints(part)
        data = json.loads(ckpt.read_text())
        data["key"]["settings"]["limit"] = 99
        ckpt.write_text(json.dumps(data))
    assert _rerun(d, tmp_path, monkeypatch, *extra) == ["original", "topk", "alloc-t"]
    assert not part.exists()


def test_rewritten_plan_file_is_evaluated_again(setup, tmp_path, monkeypatch):
    """Same path, other bytes: the plan's checkpoint is stale."""
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(setup, d)
    part, calls = tmp_path / "part", []
    monkeypatch.setattr(alloc_moe.stages.accuracy, "evaluate", _fake_evaluate(calls, kill_at=2))
    with pytest.raises(_Killed):
        main(_args(d, [tmp_path / f"o{i}.json" for i in range(3)], part))
    assert calls == ["original", "topk"] and len(_checkpoints(part)) == 2
    (d / "tight.json").write_text((d / "tight.json").read_text() + "\n")  # the same plan, other bytes
    assert _rerun(d, tmp_path, monkeypatch) == ["topk", "alloc-t"]


def test_stale_and_half_written_files_are_removed(tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    (part / ".0123.json.abc.tmp").write_text("{")  # a write killed before its rename
    (part / f"{'f' * 64}.json").write_text("{}")  # another key's
    logged = []
    store = Checkpoints(part, [{"x": 1}], log=logged.append)
    store.save(0, {"r": 1})
    store.remove_stale()
    assert [p.name for p in part.iterdir()] == [store.names[0]] and len(logged) == 2
    assert store.load(0) == {"r": 1}
    (part / store.names[0]).write_text('{"key": {"format": 1, "x": 2}, "result": {"r": 2}}')
    assert store.load(0) is None  # the file's name matches, its key does not
    store.clear()
    assert not part.exists()


def test_fingerprints():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert fingerprint("org/not-cached-model") == {"name": "org/not-cached-model", "hub_snapshot": None}
