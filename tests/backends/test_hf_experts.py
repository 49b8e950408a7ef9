"""`alloc_moe.backends.hf.experts.kept_pairs_forward` (CPU, grouped_mm, only the kept pairs) is bit-identical to
transformers' grouped_mm experts with sentinel slots, for every architecture, dtype and drop pattern (none, some,
all dropped), and `apply` installs it only while a variable-experts plan is applied."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloc_moe.backends.hf.apply import apply, moe_layers
from alloc_moe.backends.hf.experts import kept_pairs_forward
from alloc_moe import build_plan
from alloc_moe.data.zoo import make_model

TOPOLOGIES = ("olmoe-1b-7b-0924", "qwen1.5-moe-a2.7b", "deepseek-v2-lite")
_MODELS: dict = {}


def _experts(topology: str, dtype: torch.dtype):
    key = (topology, dtype)
    if key not in _MODELS:
        model = make_model(topology=topology, width="tiny", layers=2, dtype=dtype, seed=0)
        _MODELS[key] = (model, moe_layers(model)[-1])
    return _MODELS[key]


def _routing(T, E, K, drop_p, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    w = torch.rand(T, K, generator=g).to(dtype)  # [T, K]
    drop = torch.rand(T, K, generator=g) < drop_p  # [T, K]
    return torch.where(drop, torch.full_like(ids, E), ids), torch.where(drop, torch.zeros_like(w), w)


@settings(max_examples=30, deadline=None)
@given(topology=st.sampled_from(TOPOLOGIES), bf16=st.booleans(), T=st.integers(1, 40),
       drop_p=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_kept_pairs_forward_bit_identical(topology, bf16, T, drop_p, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, layer = _experts(topology, dtype)
    ex = layer.experts
    ids, w = _routing(T, layer.num_experts, layer.k_orig, drop_p, seed, dtype)
    x = torch.randn(T, model.config.hidden_size, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ex._is_expert_parallel = True
    try:
        with torch.inference_mode():
            want = type(ex).forward(ex, x, ids, w)  # transformers' grouped_mm with sentinels
            got = kept_pairs_forward(ex, x, ids, w)
    finally:
        ex._is_expert_parallel = False
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_apply_installs_and_removes_the_kept_pairs_forward():
    model, _ = _experts("olmoe-1b-7b-0924", torch.float32)
    layers = moe_layers(model)
    K = layers[0].k_orig
    idx = [m.index for m in layers]
    plan = build_plan(method="uniform", budget=K * len(layers) / 2, moe_layers=idx, k_orig=K, token_allocation="alloc-t")
    with apply(model, plan):
        assert all("forward" in m.experts.__dict__ for m in layers)
    assert all("forward" not in m.experts.__dict__ for m in layers)
    topk = build_plan(method="uniform", budget=K * len(layers) / 2, moe_layers=idx, k_orig=K)
    with apply(model, topk):
        assert all("forward" not in m.experts.__dict__ for m in layers)


def test_the_installed_forward_takes_the_kept_pairs_path_on_cpu_grouped_mm(monkeypatch):
    """A forward pass with an Alloc-T plan calls `kept_pairs_forward` once per MoE layer while the experts run
    grouped_mm on CPU, and the model's own forward under another implementation (switched after `apply`)."""
    from alloc_moe.backends.hf import experts as hf_experts

    model, _ = _experts("olmoe-1b-7b-0924", torch.float32)
    layers = moe_layers(model)
    K = layers[0].k_orig
    plan = build_plan(method="uniform", budget=K * len(layers) / 2, moe_layers=[m.index for m in layers], k_orig=K,
                      token_allocation="alloc-t")
    calls = []
    real = hf_experts.kept_pairs_forward
    monkeypatch.setattr(hf_experts, "kept_pairs_forward", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    impl = model.config._experts_implementation
    with apply(model, plan), torch.inference_mode():
        assert impl == "grouped_mm"
        model(ids)
        assert len(calls) == len(layers)
        for m in layers:
            m.experts.config._experts_implementation = "eager"
        try:
            model(ids)
        finally:
            for m in layers:
                m.experts.config._experts_implementation = impl
        assert len(calls) == len(layers)  # eager: the model's own forward, not the kept-pairs path
