"""Token-level allocation inside one MoE layer.

The backends work on the router's own candidate slots: `scores [T, K]` are the routing probabilities of each token's
top-K_orig experts, in whatever order the router returned them (DeepseekV2's top-k is unsorted). A slot allocator
returns `keep [T, K]` (bool) and never reorders slots, so keeping everything reproduces the router exactly.

Everything here has static shapes and no host synchronisation (.item(), nonzero, boolean indexing), so it can run
inside torch.compile / CUDA graphs. `TOKEN_METHODS` maps a plan's `token_allocation` to its slot allocator; the
`[T, E]` functions (`alloc_t`, `topk_mask`, ...) are the same algorithms on full probability rows.
"""

import math
from collections.abc import Callable

import torch

NEG_INF = float("-inf")


def _scatter_slots(probs: torch.Tensor, k_orig: int, keep_fn) -> torch.Tensor:
    """Run a slot allocator on the top-k_orig candidates of `probs [T, E]` and return the [T, E] mask."""
    vals, ids = probs.topk(k_orig, dim=-1)  # [T, K]
    keep = keep_fn(vals)  # [T, K]
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, ids, keep)


def topk_slots(scores: torch.Tensor, *, k: int, token_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """Plain top-k: each token keeps its k highest-scoring candidates."""
    T, K = scores.shape
    k = int(k)
    if k >= K:
        return torch.ones_like(scores, dtype=torch.bool)
    pos = scores.topk(k, dim=-1).indices  # [T, k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, pos, True)


def alloc_t_slots(
    scores: torch.Tensor, *, k_layer: float, k_base: int = 1, token_mask: torch.Tensor | None = None, **_
) -> torch.Tensor:
    """Alloc-T (eqs. 8-10): every token keeps its top-k_base candidates; the remaining floor(T*k_layer) - T*k_base
    activations go to the globally highest remaining candidate scores of the layer.

    `token_mask [T]` (True = real token) excludes padding: padding tokens get no experts and T counts real tokens
    only, so they spend no budget. Requires k_base <= k_layer <= K.
    """
    T, K = scores.shape
    if not 0 <= k_base <= K or not k_base <= k_layer <= K:
        raise ValueError(f"alloc-t needs 0 <= k_base <= k_layer <= k_orig, got k_base={k_base} k_layer={k_layer} k_orig={K}")
    keep = topk_slots(scores, k=k_base) if k_base > 0 else torch.zeros_like(scores, dtype=torch.bool)  # [T, K]
    rest = scores.masked_fill(keep, NEG_INF)  # [T, K] candidates not yet kept
    if token_mask is not None:
        keep = keep & token_mask[:, None]
        rest = rest.masked_fill(~token_mask[:, None], NEG_INF)
    # static upper bound on the extra activations (all tokens real); the real count may be smaller with padding
    n_max = min(math.floor(T * k_layer + 1e-9) - T * k_base, T * (K - k_base))
    if n_max <= 0:
        return keep
    vals, pos = rest.flatten().topk(n_max)  # [n_max] sorted descending
    take = vals > NEG_INF
    if token_mask is not None:
        n_real = token_mask.sum().to(torch.float64)
        n_extra = torch.floor(n_real * k_layer + 1e-9) - n_real * k_base
        take = take & (torch.arange(n_max, device=scores.device) < n_extra)
    extra = torch.zeros(T * K, dtype=torch.bool, device=scores.device).scatter(0, pos, take)
    return keep | extra.view(T, K)


def top_p_slots(scores: torch.Tensor, *, threshold: float, token_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """Dynamic-MoE top-p: keep the highest-probability candidates until their cumulative probability reaches p,
    the crossing expert included; at most K_orig (the candidate count); weights are not renormalised."""
    sorted_vals, order = scores.sort(dim=-1, descending=True)  # [T, K]
    before = sorted_vals.cumsum(dim=-1) - sorted_vals  # [T, K] mass of the higher-ranked candidates
    keep_sorted = before < threshold
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def naee_slots(scores: torch.Tensor, *, threshold: float, token_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """NAEE dynamic skipping, generalised to top-K: keep the top-1 expert and every candidate whose probability
    is at least beta * p_top1 (beta = threshold)."""
    top1 = scores.max(dim=-1, keepdim=True).values  # [T, 1]
    return (scores >= threshold * top1) | (scores == top1)


TOKEN_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "topk": topk_slots,
    "alloc-t": alloc_t_slots,
    "top-p": top_p_slots,
    "naee": naee_slots,
}


# ---- the same algorithms on full probability rows [T, E] ----

def topk_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    return _scatter_slots(probs, k, lambda v: torch.ones_like(v, dtype=torch.bool))


def alloc_t(probs: torch.Tensor, k_layer: float, k_base: int = 1, k_orig: int = 2, token_mask=None) -> torch.Tensor:
    """Alloc-T on routing probabilities `probs [T, E]`; returns the kept token-expert pairs as `BoolTensor [T, E]`."""
    return _scatter_slots(probs, k_orig, lambda v: alloc_t_slots(v, k_layer=k_layer, k_base=k_base, token_mask=token_mask))


def top_p_mask(probs: torch.Tensor, p: float, k_orig: int) -> torch.Tensor:
    return _scatter_slots(probs, k_orig, lambda v: top_p_slots(v, threshold=p))


def naee_mask(probs: torch.Tensor, beta: float, k_orig: int) -> torch.Tensor:
    return _scatter_slots(probs, k_orig, lambda v: naee_slots(v, threshold=beta))


def mask_to_slots(
    mask: torch.Tensor, weights: torch.Tensor, k_orig: int, dropped_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-shape routing tensors for a backend from a kept-pairs mask.

    mask [T, E] (at most k_orig True per row), weights [T, E] -> (topk_ids [T, k_orig], topk_weights [T, k_orig],
    keep [T, k_orig]); dropped slots have id `dropped_id` (transformers: num_experts; vLLM: -1) and weight 0.
    """
    rank = weights.float().masked_fill(~mask, NEG_INF)  # kept pairs first, by weight
    _, ids = rank.topk(k_orig, dim=-1)  # [T, k_orig]
    keep = mask.gather(1, ids)
    topk_weights = torch.where(keep, weights.gather(1, ids), torch.zeros((), dtype=weights.dtype, device=weights.device))
    topk_ids = torch.where(keep, ids, torch.full_like(ids, dropped_id))
    return topk_ids, topk_weights, keep
