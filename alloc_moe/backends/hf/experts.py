"""The `grouped_mm` experts on CPU with dropped pairs: only the kept pairs are gathered, activated and weighted.

transformers' `grouped_mm_experts_forward` skips the GEMM rows of sentinel pairs (id `num_experts`, sorted to the
tail), but still gathers, masks (`_is_expert_parallel`), activates, weights and un-permutes all T*K_orig slots: at half
budget that is twice the element-wise traffic of a top-k plan (OLMoE full width, prefill 8 x 32 tokens: ~65 ms of
~500 ms per 3 layers, `benchmarks/bench_alloc_t_decode.py --profile`). `kept_pairs_forward` runs the same ops on the
P kept rows only (P = the last grouped_mm offset, one host read: CPU only) and writes zeros for the dropped slots
before the same per-token sum over slots, so its output is bit-identical to transformers' (the GEMM groups, their
rows and the summation order are unchanged; a dropped slot adds +0 in both).

On other devices, and for other experts implementations, the model's own forward runs (no host sync on GPU).
"""

import torch


def _grouped_linear():
    from transformers.integrations.moe import _grouped_linear as fn

    return fn


def kept_pairs_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped_mm experts forward on the kept pairs only (sentinel id = num_experts), CPU."""
    T, K = top_k_index.shape
    H, E = hidden_states.size(-1), experts.num_experts
    linear = _grouped_linear()
    ids_g, perm = torch.sort(top_k_index.reshape(-1))  # [T*K] sentinels (id E) sort to the tail
    offsets = torch.cumsum(torch.histc(ids_g.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)  # [E]
    P = int(offsets[-1])  # kept pairs
    kept = perm[:P]  # [P] slot index t*K + k of each kept pair, grouped by expert
    x = hidden_states[kept // K]  # [P, H]
    ids = ids_g[:P]
    if experts.has_gate:
        bias = experts.gate_up_proj_bias[ids] if experts.has_bias else None
        h = experts._apply_gate(linear(x, experts.gate_up_proj, offsets, bias=bias,
                                       is_transposed=experts.is_transposed))  # [P, I]
    else:
        bias = experts.up_proj_bias[ids] if experts.has_bias else None
        h = experts.act_fn(linear(x, experts.up_proj, offsets, bias=bias, is_transposed=experts.is_transposed))
    bias = experts.down_proj_bias[ids] if experts.has_bias else None
    h = linear(h, experts.down_proj, offsets, bias=bias, is_transposed=experts.is_transposed)  # [P, H]
    if getattr(experts, "has_post_expert_norm", False):
        h = experts.post_expert_norm(h)
    weighted = h * top_k_weights.reshape(-1)[kept].unsqueeze(-1)  # [P, H]
    slots = weighted.new_zeros(T * K, H).index_copy_(0, kept, weighted)  # [T*K, H] dropped slots 0
    return slots.view(T, K, H).sum(dim=1).to(hidden_states.dtype)  # [T, H]


def make_forward(experts):
    """A forward for `experts` (bound: set it as the instance's `forward`) that takes the kept-pairs path on CPU with
    the grouped_mm implementation and the model's own forward otherwise (the implementation is read per call: it can
    be switched after the plan is applied; the lookup is resolved here, once)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

    own = experts.forward
    config = getattr(experts, "config", None)

    def forward(hidden_states, top_k_index, top_k_weights):
        impl = getattr(config, "_experts_implementation", None)
        grouped_mm = impl is not None and ALL_EXPERTS_FUNCTIONS.get(impl, None) is grouped_mm_experts_forward
        if hidden_states.device.type == "cpu" and grouped_mm:
            return kept_pairs_forward(experts, hidden_states, top_k_index, top_k_weights)
        return own(hidden_states, top_k_index, top_k_weights)

    return forward
