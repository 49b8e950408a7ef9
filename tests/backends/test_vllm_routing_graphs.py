"""The vLLM router patch (`vllm_backend.routing`) in the paper's CUDA-graph setting, without vLLM or a GPU.

The step scope's routing function must be static-shape and free of host syncs (a CUDA graph replays it every
decode step; under torch.compile it must trace as one graph), and the tokens vLLM adds to fill a captured graph's
size (`forward_context.is_padding`) must not spend Alloc-T budget. The sequence scope is refused outside eager mode.
"""

import types

import pytest
import torch
from helpers import graph_ops, sync_ops

from alloc_moe.backends.vllm import routing
from alloc_moe.core.routing import LayerRule
from alloc_moe.errors import AllocMoeError

E, K = 16, 4


def _orig(hidden_states, router_logits, indices_type, **_):
    """The router's own top-K (what vLLM's softmax-top-k router returns): weights [T, K], ids [T, K]."""
    w, ids = router_logits.float().softmax(-1).topk(K, dim=-1)
    return w, ids.to(indices_type)


def _patched(mode="alloc-t", renormalize=False):
    router = types.SimpleNamespace(renormalize=renormalize)
    args = (("k_layer", 2.0), ("k_base", 1)) if mode == "alloc-t" else (("threshold", 0.5),)
    return routing._routing_patch(router, _orig, LayerRule(mode, args), False)


def _ctx(monkeypatch, is_padding):
    ctx = types.SimpleNamespace(is_padding=is_padding)
    monkeypatch.setattr(routing, "_forward_context", lambda: ctx)
    return ctx


def _logits(T, seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("renormalize", [False, True])
def test_padding_rows_spend_no_alloc_t_budget(monkeypatch, renormalize):
    """8 rows, the last 3 graph padding with the highest scores of all: the 5 real rows get exactly what they get
    alone (budget floor(5 * k_layer)), and padding rows get no expert (id -1, weight 0)."""
    real = _logits(5)
    pad = torch.full((3, E), -20.0)
    pad[:, 0] = 50.0  # padding rows would win every global comparison if they competed
    fn = _patched(renormalize=renormalize)
    _ctx(monkeypatch, torch.zeros(5, dtype=torch.bool))
    w_alone, ids_alone = fn(None, real, torch.int32)
    _ctx(monkeypatch, torch.tensor([False] * 5 + [True] * 3 + [True] * 8))  # the runner's buffer is longer than T
    w, ids = fn(None, torch.cat([real, pad]), torch.int32)
    assert torch.equal(ids[:5], ids_alone) and torch.equal(w[:5], w_alone)
    assert (ids[5:] == routing.DROPPED_ID).all() and (w[5:] == 0).all()
    assert int((ids[:5] >= 0).sum()) == 10  # floor(5 * 2.0) kept pairs: the budget of the real tokens only


def test_no_padding_information_means_every_row_competes(monkeypatch):
    """Without `is_padding` (a build that does not set it) every row is a token: state it, as the docstring does."""
    monkeypatch.setattr(routing, "_forward_context", lambda: None)
    _, ids = _patched()(None, _logits(8), torch.int32)
    assert int((ids >= 0).sum()) == 16


@pytest.mark.parametrize("mode", ["alloc-t", "top-p", "naee"])
def test_step_scope_routing_has_no_host_sync_and_static_shape(monkeypatch, mode):
    fn = _patched(mode)
    ctx = _ctx(monkeypatch, None)

    def routed(logits, pad):
        ctx.is_padding = pad
        return fn(None, logits, torch.int32)

    for T in (1, 8, 64):
        pad = torch.arange(T) >= T - 1
        ops = graph_ops(routed, _logits(T), pad)
        assert ops and not sync_ops(ops), sync_ops(ops)
        w, ids = routed(_logits(T), pad)
        assert w.shape == ids.shape == (T, K)  # the router's [T, K_orig]: a graph's buffers keep their shape


def test_step_scope_routing_compiles_fullgraph(monkeypatch):
    """TorchDynamo traces the whole patched router as one graph (a host sync would break it) and matches eager."""
    import torch._dynamo

    fn = _patched("alloc-t")
    _ctx(monkeypatch, torch.arange(32) >= 29)  # the runner's padding buffer, read from the forward context

    def routed(logits):
        return fn(None, logits, torch.int32)

    logits = _logits(32, seed=3)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(routed)(logits)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(routed, fullgraph=True, backend="eager")
    for got, want in zip(compiled(logits), routed(logits)):
        assert torch.equal(got, want)
    torch._dynamo.reset()


def test_sequence_scope_refused_with_graphs_or_compile():
    routing.check_scope("sequence", True)  # eager: fine
    routing.check_scope("sequence", None)  # unknown (plan applied outside a load): fine
    routing.check_scope("step", False)
    with pytest.raises(AllocMoeError) as e:
        routing.check_scope("sequence", False)
    assert "vllm mode eager" in str(e.value) and "\n" not in str(e.value)
