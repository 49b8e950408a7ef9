"""The one place where a token-expert pair is dropped: both backends call `drop_pairs` from their router patch.

A backend's router has already chosen each token's K_orig candidate experts (`ids [T, K]`, the router's own slot
order) and their weights. A plan's layer rule (`LayerRule`, one per MoE layer, from `layer_rules(plan)`) decides
which candidates are kept, from the routing probabilities of the candidates. A dropped pair keeps its slot (shapes
stay [T, K_orig]: static, CUDA-graph safe) with weight 0 and the backend's sentinel id (transformers: `num_experts`,
which its experts skip; vLLM: -1, which its kernels skip). Routers that renormalise their top-k weights renormalise
over the kept experts; a row where everything is kept stays bit-identical to the router's output.

Nothing here synchronises with the host or has a data-dependent shape (except the optional per-request `bounds`,
which only vLLM's eager `sequence` scope passes).
"""

import dataclasses

import torch

from .token_alloc import TOKEN_METHODS


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """What a plan asks of one MoE layer in a variable-experts mode: `mode` (a `TOKEN_METHODS` key other than
    `topk`) and its arguments (`k_layer`, `k_base` for alloc-t; `threshold` for top-p / naee)."""

    mode: str
    args: tuple[tuple[str, float], ...]
    keeps_everything: bool = False  # Alloc-T at K_orig: every candidate is kept, padding included

    @property
    def uses_token_mask(self) -> bool:
        """Alloc-T spends a budget over the layer's tokens: padding must not count (the other rules are per token).
        At K_orig nothing is spent, and padding keeps its experts as in the original model."""
        return self.mode == "alloc-t" and not self.keeps_everything

    def keep(self, scores: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """keep [T, K] for candidate scores [T, K]."""
        return TOKEN_METHODS[self.mode](scores, token_mask=token_mask, **dict(self.args))


def layer_rules(plan, k_origs: list[int]) -> list[LayerRule | None]:
    """One rule per MoE layer of `plan` (aligned with `plan.k_per_layer`); None for every layer in top-k mode (the
    backends set the router's K instead: routing stays the model's own). An Alloc-T layer at K_orig gets a rule with
    `keeps_everything`: a backend may leave such a layer unpatched (vLLM does, so its CPU kernel stays the original)."""
    mode = plan.token_allocation
    if mode == "topk":
        return [None] * len(plan.k_per_layer)
    rules = []
    for i, (k, k_orig) in enumerate(zip(plan.k_per_layer, k_origs)):
        if mode == "alloc-t":
            rules.append(LayerRule(mode, (("k_layer", float(k)), ("k_base", plan.k_base)), k == k_orig))
        else:
            rules.append(LayerRule(mode, (("threshold", float(plan.thresholds[i])),)))
    return rules


def keep_pairs(scores: torch.Tensor, rule: LayerRule, token_mask: torch.Tensor | None = None,
               bounds: list[int] | None = None) -> torch.Tensor:
    """keep [T, K]; with `bounds` ([0, n_1, ..., T], request offsets) each request's tokens compete only among
    themselves (vLLM's eager `sequence` scope)."""
    if bounds is None or len(bounds) <= 2:
        return rule.keep(scores, token_mask)
    return torch.cat([rule.keep(scores[a:b], None if token_mask is None else token_mask[a:b])
                      for a, b in zip(bounds[:-1], bounds[1:]) if b > a])


def drop_pairs(router_logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, rule: LayerRule, *,
               sentinel: int, renormalize: bool, token_mask: torch.Tensor | None = None,
               bounds: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's (weights [T, K], ids [T, K]) with the pairs `rule` drops set to (0, sentinel).

    router_logits [T, E]: the candidates are scored by their softmax probability (all five supported architectures
    route by softmax). token_mask [T] (True = real token) keeps padding out of Alloc-T's budget.
    """
    probs = router_logits.float().softmax(dim=-1)  # [T, E]
    scores = probs.gather(1, ids.long())  # [T, K] in the router's slot order
    keep = keep_pairs(scores, rule, token_mask if rule.uses_token_mask else None, bounds)  # [T, K]
    new_w = torch.where(keep, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    if renormalize:
        renormed = new_w / new_w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(new_w.dtype).tiny)
        new_w = torch.where(keep.all(dim=-1, keepdim=True), weights, renormed)  # untouched rows stay bit-exact
    new_ids = torch.where(keep, ids, torch.full_like(ids, sentinel))
    return new_w, new_ids
