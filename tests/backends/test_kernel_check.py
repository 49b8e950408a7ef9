"""The torch stand-ins for vLLM's CUDA-only MoE ops (`alloc_moe.backends.vllm.kernel_check`), on hand-made cases.

They replace `moe_align_block_size`, `moe_sum` and `silu_and_mul` when vLLM's real Triton experts run on CPU under
Triton's interpreter (tests/backends/test_vllm_triton_interpret.py), so their semantics are pinned here by hand. No vLLM
needed.
"""

import torch

from alloc_moe.backends.vllm.kernel_check import (
    CASES,
    dense_reference,
    make_inputs,
    moe_align_block_size,
    moe_sum,
    silu_and_mul,
)


def _align(topk_ids, E, block, expert_map=None):
    numel = topk_ids.numel()
    max_padded = numel + E * (block - 1)
    sorted_ids = torch.full((max_padded,), 12345, dtype=torch.int32)
    expert_ids = torch.full(((max_padded + block - 1) // block,), 12345, dtype=torch.int32)
    post = torch.full((1,), 12345, dtype=torch.int32)
    moe_align_block_size(topk_ids, E, block, sorted_ids, expert_ids, post, expert_map)
    return sorted_ids.tolist(), expert_ids.tolist(), int(post)


def test_align_groups_pads_and_skips_dropped_pairs():
    # pairs (flat index): 0:t0s0->e0, 1:t0s1 dropped, 2:t1s0->e1, 3:t1s1->e0, 4:t2s0->e2, 5:t2s1 dropped
    ids = torch.tensor([[0, -1], [1, 0], [2, -1]], dtype=torch.int32)
    sorted_ids, expert_ids, post = _align(ids, E=4, block=2)
    S = 6  # the sentinel: topk_ids.numel()
    assert post == 6  # e0: 2 rows, e1: 1 -> 2, e2: 1 -> 2, e3: 0
    assert sorted_ids[:6] == [0, 3, 2, S, 4, S]
    assert set(sorted_ids[6:]) == {S}
    assert expert_ids[:3] == [0, 1, 2] and set(expert_ids[3:]) == {-1}


def test_align_all_dropped_and_block_larger_than_counts():
    ids = torch.full((3, 2), -1, dtype=torch.int32)
    sorted_ids, expert_ids, post = _align(ids, E=4, block=4)
    assert post == 0 and set(sorted_ids) == {6} and set(expert_ids) == {-1}
    ids = torch.tensor([[3, 1]], dtype=torch.int32)
    sorted_ids, expert_ids, post = _align(ids, E=4, block=4)
    assert post == 8
    assert sorted_ids[:8] == [1, 2, 2, 2, 0, 2, 2, 2] and expert_ids[:2] == [1, 3]


def test_align_with_expert_map_skips_remote_experts():
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    emap = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)  # experts 1 and 3 are local 0 and 1
    sorted_ids, expert_ids, post = _align(ids, E=2, block=1, expert_map=emap)
    assert post == 2 and sorted_ids[:2] == [1, 3] and expert_ids[:2] == [0, 1]


def test_moe_sum_plain_and_pad_aware():
    inp = torch.tensor([[[1.0, 2.0], [10.0, 20.0]], [[float("nan"), float("nan")], [3.0, 4.0]]])  # [T=2, K=2, H=2]
    out = torch.empty(2, 2)
    moe_sum(inp[:1], out[:1])
    assert out[0].tolist() == [11.0, 22.0]
    ids = torch.tensor([[5, 7], [-1, 2]], dtype=torch.int32)
    moe_sum(inp, out, ids)
    assert out.tolist() == [[11.0, 22.0], [3.0, 4.0]]  # the dropped slot's NaN row is never added
    moe_sum(inp, out, ids, expert_map=torch.tensor([0, 0, 0, 0, 0, 0, 0, -1], dtype=torch.int32))
    assert out.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # expert 7 is remote: skipped too
    plain = torch.empty(2, 2)
    moe_sum(inp, plain)
    assert torch.isnan(plain[1]).all()  # without topk_ids every slot is summed: what our patch prevents


def test_silu_and_mul():
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0]])
    out = torch.empty(1, 2)
    silu_and_mul(out, x)
    sig = torch.sigmoid(torch.tensor([1.0, -2.0]))
    expect = [1.0 * sig[0].item() * 3.0, -2.0 * sig[1].item() * 4.0]  # silu(x) = x * sigmoid(x)
    assert torch.allclose(out[0], torch.tensor(expect))


def test_cases_and_dense_reference():
    """Every case drops what it says, keeps router-like ids (distinct per token), and the dense reference ignores
    dropped pairs (changing a dropped pair's id or weight changes nothing)."""
    names = {c.name for c in CASES}
    assert {"aligned-fp32", "aligned-fp16", "small-batch-fp32", "small-batch-fp16"} <= names
    for case in CASES:
        hidden, w1, w2, weights, ids = make_inputs(case)
        assert ids.shape == (case.tokens, case.top_k)
        assert case.small_batch == (case.tokens * case.top_k * 4 <= case.experts)
        for row in ids.tolist():
            kept = [i for i in row if i >= 0]
            assert len(kept) == len(set(kept))
        assert bool(((ids < 0) == (weights == 0)).all())
        if 0 < case.drop < 1:
            assert (ids < 0).any() and (ids >= 0).any()
    hidden, w1, w2, weights, ids = make_inputs(CASES[0])
    ref = dense_reference(hidden, w1, w2, weights, ids)
    dropped_t, dropped_k = (ids < 0).nonzero()[0].tolist()
    weights2 = weights.clone()
    weights2[dropped_t, dropped_k] = 5.0  # a dropped pair's weight is never read
    assert torch.equal(ref, dense_reference(hidden, w1, w2, weights2, ids))
    kept_t, kept_k = (ids >= 0).nonzero()[0].tolist()
    ids3 = ids.clone()
    ids3[kept_t, kept_k] = -1
    assert not torch.equal(ref, dense_reference(hidden, w1, w2, weights, ids3))  # a kept pair does count


def test_align_and_sum_have_no_host_sync():
    """The stand-ins run inside the GPU check's captured CUDA graph: no op that reads a value on the host."""
    from helpers import graph_ops, sync_ops

    ids = torch.tensor([[0, -1], [1, 0], [2, -1]], dtype=torch.int32)

    def align(topk_ids):
        i32 = dict(dtype=torch.int32)
        s, e, n = torch.empty(6 + 4 * 3, **i32), torch.empty(5, **i32), torch.empty(1, **i32)
        moe_align_block_size(topk_ids, 4, 4, s, e, n)
        return s, e, n

    def summed(inp, topk_ids):
        out = torch.empty(3, 5)
        moe_sum(inp, out, topk_ids)
        return out

    for ops in (graph_ops(align, ids), graph_ops(summed, torch.randn(3, 2, 5), ids)):
        assert ops and not sync_ops(ops), sync_ops(ops)
