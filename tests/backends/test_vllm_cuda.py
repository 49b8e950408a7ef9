"""The vLLM backend on CUDA (Triton fused MoE): skipped without a GPU and a CUDA build of vLLM.

NOT yet run by this project (no GPU was available when they were written): they state what must hold there. What
can be checked without a GPU is: vLLM's Triton experts with dropped pairs under Triton's interpreter
(tests/backends/test_vllm_triton_interpret.py), the graph-safety of the routing patch (tests/backends/test_vllm_routing_graphs.py), and
`benchmarks/gpu_check.py --smoke`. TF32 is off for the whole module (fp32 parity at 1e-5).
- parity with HF for every token mode, fp32, eager;
- dropped pairs reach the Triton kernels as id -1 / weight 0 with the router's [T, K_orig] shape kept, and the
  experts' final reduction ignores them (`moe_sum` with topk_ids);
- CUDA graphs (non-eager): same results as eager;
- pairs: the non-negative ids handed to the kernel equal what HF's experts computed.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
# Triton's fp32 `tl.dot` uses TF32 on NVIDIA unless told otherwise, and vLLM calls it without a precision: parity at
# 1e-5 needs IEEE fp32. Set before vLLM (and so Triton) is imported; the engine's worker processes inherit it.
os.environ["TRITON_F32_DEFAULT"] = "ieee"
torch.backends.cuda.matmul.allow_tf32 = False  # the HF reference's fp32 matmuls too
torch.backends.cudnn.allow_tf32 = False
pytest.importorskip("vllm", reason="vLLM is not installed")

from vllm_helpers import (  # noqa: E402
    LOGPROB_TOL,
    hf_model,
    hf_prompt_logprobs,
    plan_for,
    prompts,
    vllm_one_by_one,
    write_zoo,
)

from alloc_moe.backends.vllm import engine  # noqa: E402
from alloc_moe.backends.vllm.routing import apply_plan, remove_plan  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.cuda, pytest.mark.vllm]
MODES = {
    "topk": dict(ks=[1, 2, 3]),
    "alloc-t": dict(ks=[2.5, 1.5, 3.25]),
    "top-p": dict(ks=[2.0, 2.0, 3.0], thresholds=[0.4, 0.6, 0.8]),
    "naee": dict(ks=[2.0, 2.0, 3.0], thresholds=[0.3, 0.5, 0.2]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vllm import LLM

    model_dir = write_zoo(tmp_path_factory.mktemp("cuda") / "olmoe", "olmoe")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = LLM(model=model_dir, distributed_executor_backend="uni",  # eager: plans are set after load here
              **engine.engine_kwargs(dtype="float32", seed=0, mode="eager", gpu_memory_utilization=0.3,
                                     moe_backend="triton"))
    hf = hf_model(model_dir).cuda()
    yield model_dir, hf, llm
    engine.shutdown(llm)
    mp.undo()


def _plan(model_dir, mode):
    return plan_for(model_dir, mode, **MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_parity_and_sentinels(setup, mode):
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    model_dir, hf, llm = setup
    plan = _plan(model_dir, mode)
    seen = []
    real_apply = TritonExperts.apply

    def spy(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *a, **k):
        seen.append((topk_ids.shape, int((topk_ids < 0).sum()), float(topk_weights[topk_ids < 0].abs().sum())))
        return real_apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *a, **k)

    TritonExperts.apply = spy
    llm.apply_model(lambda m: apply_plan(m, plan) and None)
    try:
        got = vllm_one_by_one(llm, prompts())
    finally:
        llm.apply_model(remove_plan)
        TritonExperts.apply = real_apply
    for ids, (lp, _) in zip(prompts(), got):
        ref = hf_prompt_logprobs(hf, torch.tensor(ids).tolist(), plan)
        assert float((lp - ref.cpu()).abs().max()) <= LOGPROB_TOL
    if mode != "topk":
        assert all(shape[1] == plan.k_orig for shape, _, _ in seen)  # static shape [T, K_orig]
        assert sum(n for _, n, _ in seen) > 0  # some pairs were dropped with id -1 ...
        assert all(w == 0.0 for _, _, w in seen)  # ... and weight 0


def test_cuda_graphs_match_eager(tmp_path, monkeypatch):
    from vllm import LLM

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    model_dir = write_zoo(tmp_path / "olmoe", "olmoe")
    hf = hf_model(model_dir).cuda()
    plan = _plan(model_dir, "alloc-t")
    with engine.plan_env(plan):
        llm = LLM(model=model_dir, **engine.engine_kwargs(dtype="float32", seed=0, mode="graphs",
                                                          gpu_memory_utilization=0.3, moe_backend="triton"))
        try:
            got = vllm_one_by_one(llm, prompts())
        finally:
            engine.shutdown(llm)
    for ids, (lp, _) in zip(prompts(), got):
        assert float((lp - hf_prompt_logprobs(hf, ids, plan).cpu()).abs().max()) <= LOGPROB_TOL
