"""Opt-in routing statistics of a patched model, kept as device tensors (no host sync in the forward pass).

Recorded per MoE layer (decoder index):
- `pairs`: token-expert pairs actually handed to the experts (what was computed),
- `tokens`: tokens routed, `loads [E]`: computed pairs per expert,
- `per_token [K_orig + 1]`: histogram of experts computed per token,
- `entropy_sum`: summed routing entropy (nats) of each token's full softmax,
- optionally (`record_tokens`) `weighted_loads [E]`: summed routing weights of the computed pairs per expert, and
  `token_counts`: every token's computed-expert count, in the order `entropy` (`record_entropy`) lists tokens,
- optionally `scores`: each token's top-K_orig routing probabilities (sorted), for threshold calibration.
"""

from pathlib import Path

import torch

from ...errors import AllocMoeError
from ...io import atomic_path


class RoutingStats:
    def __init__(self, record_scores: bool = False, max_scores_per_layer: int | None = None, record_entropy: bool = False,
                 record_tokens: bool = False):
        self.record_scores = record_scores
        self.max_scores_per_layer = max_scores_per_layer
        self.record_entropy = record_entropy
        self.record_tokens = record_tokens
        self.weighted_loads: dict[int, torch.Tensor] = {}
        self.token_counts: dict[int, list[torch.Tensor]] = {}
        self.pairs: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.loads: dict[int, torch.Tensor] = {}
        self.per_token: dict[int, torch.Tensor] = {}
        self.entropy_sum: dict[int, torch.Tensor] = {}
        self.entropy: dict[int, list[torch.Tensor]] = {}
        self.scores: dict[int, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.__init__(self.record_scores, self.max_scores_per_layer, self.record_entropy, self.record_tokens)

    # called from the hooks
    def observe_router(self, layer: int, logits: torch.Tensor, k_orig: int) -> None:
        probs = logits.float().softmax(dim=-1)  # [T, E]
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)  # [T]
        self.entropy_sum[layer] = self.entropy_sum.get(layer, 0) + ent.sum(dtype=torch.float64)
        if self.record_entropy:
            self.entropy.setdefault(layer, []).append(ent.detach().cpu())
        if self.record_scores:
            kept = sum(s.shape[0] for s in self.scores.get(layer, []))
            if self.max_scores_per_layer is None or kept < self.max_scores_per_layer:
                self.scores.setdefault(layer, []).append(probs.topk(k_orig, dim=-1).values.detach().cpu())

    def observe_experts(self, layer: int, top_k_index: torch.Tensor, num_experts: int, k_orig: int,
                        top_k_weights: torch.Tensor | None = None) -> None:
        valid = top_k_index < num_experts  # [T, K] sentinel slots are not computed
        T = top_k_index.shape[0]
        n = valid.sum(dim=-1)  # [T]
        idx = torch.where(valid, top_k_index, num_experts).flatten()
        loads = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx.device).index_add_(0, idx, torch.ones_like(idx))
        hist = torch.zeros(k_orig + 1, dtype=torch.int64, device=idx.device).index_add_(0, n.clamp(max=k_orig), torch.ones_like(n))
        self.pairs[layer] = self.pairs.get(layer, 0) + n.sum()
        self.tokens[layer] = self.tokens.get(layer, 0) + T
        self.loads[layer] = self.loads.get(layer, 0) + loads[:num_experts]
        self.per_token[layer] = self.per_token.get(layer, 0) + hist
        if self.record_tokens and top_k_weights is not None:
            w = torch.where(valid, top_k_weights.float(), 0.0).flatten()  # [T*K]
            wl = torch.zeros(num_experts + 1, dtype=torch.float64, device=idx.device).index_add_(0, idx, w.double())
            self.weighted_loads[layer] = self.weighted_loads.get(layer, 0) + wl[:num_experts]
            self.token_counts.setdefault(layer, []).append(n.detach().cpu())

    # read-out (host sync happens here, once)
    def computed_pairs(self) -> dict[int, int]:
        return {layer: int(v) for layer, v in sorted(self.pairs.items())}

    def summary(self) -> list[dict]:
        """One row per MoE layer: tokens, computed pairs, mean activations per token, entropy, load imbalance."""
        rows = []
        for layer in sorted(self.pairs):
            loads = self.loads[layer].double().cpu()
            tokens = self.tokens[layer]
            rows.append({
                "layer": layer,
                "tokens": tokens,
                "computed_pairs": int(self.pairs[layer]),
                "activations_per_token": int(self.pairs[layer]) / max(tokens, 1),
                "mean_entropy": float(self.entropy_sum.get(layer, torch.tensor(0.0))) / max(tokens, 1),
                "max_load_over_mean": float(loads.max() / loads.mean()) if loads.sum() > 0 else 0.0,
            })
        return rows

    def routing_scores(self) -> dict[int, torch.Tensor]:
        out = {layer: torch.cat(chunks) for layer, chunks in sorted(self.scores.items())}
        if self.max_scores_per_layer is not None:
            out = {layer: s[: self.max_scores_per_layer] for layer, s in out.items()}
        return out

    def save_routing_scores(self, path) -> None:
        if not self.scores:
            raise AllocMoeError("no routing scores were recorded (use record_scores=True)")
        with atomic_path(path) as tmp:
            torch.save({"format": "alloc-moe-routing-scores", "version": 1, "scores": self.routing_scores()}, tmp)


def routing_scores_sha256(scores: dict[int, torch.Tensor]) -> str:
    """sha256 of the scores themselves (layer, dtype, shape and bytes, in layer order): what a plan records. The file's
    own bytes are not reproducible (torch.save writes a random serialization id and the temporary file's name)."""
    import hashlib

    h = hashlib.sha256()
    for layer in sorted(scores):
        s = scores[layer].detach().to("cpu").contiguous()
        h.update(f"{layer}:{s.dtype}:{tuple(s.shape)};".encode())
        h.update(s.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_routing_scores(path) -> dict[int, torch.Tensor]:
    """{decoder layer: scores [N, K_orig]} written by `RoutingStats.save_routing_scores`."""
    path = Path(path)
    if not path.is_file():
        raise AllocMoeError(f"routing scores file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise AllocMoeError(f"cannot read routing scores {path}: {type(e).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != "alloc-moe-routing-scores":
        raise AllocMoeError(f"{path} is not an alloc-moe routing scores file")
    return {int(k): v for k, v in blob["scores"].items()}
