"""Deterministic batched perplexity of a causal LM over token windows."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alloc_moe.data.text import Windows
from alloc_moe.errors import AllocMoeError


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_tokens: int  # predicted tokens: windows * (seq_len - 1)
    per_family: dict[str, tuple[float, int]] = field(default_factory=dict)  # family -> (ppl, tokens)

    def to_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "nll_sum": self.nll_sum,
            "n_tokens": self.n_tokens,
            "per_family": {f: {"ppl": p, "n_tokens": n} for f, (p, n) in self.per_family.items()},
        }


def _ppl(nll_sum: float, n_tokens: int) -> float:
    try:
        return math.exp(nll_sum / n_tokens)
    except OverflowError:
        return math.inf


def nll_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed next-token NLL per row, float64: logits [B, S, V], input_ids [B, S] -> [B].

    With `attention_mask` [B, S], targets at masked (0) positions are not counted.
    """
    B = logits.shape[0]
    out = torch.empty(B, dtype=torch.float64, device=logits.device)
    # One row at a time so the float32 upcast costs [S, V], not [B, S, V] (large vocabularies).
    for b in range(B):
        nll = F.cross_entropy(logits[b, :-1].float(), input_ids[b, 1:].to(logits.device), reduction="none")  # [S-1]
        if attention_mask is not None:
            nll = nll * attention_mask[b, 1:].to(nll.device, nll.dtype)
        out[b] = nll.double().sum()
    return out


def window_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token NLL per window: input_ids [B, S] -> [B] float64 (on the logits' device)."""
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [B, S, V]
        return nll_from_logits(logits, input_ids, attention_mask)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(model, "device", "cpu"))


def perplexity(
    model, windows: Windows, *, batch_size: int = 8, device=None, progress: bool = True, desc: str = "ppl"
) -> PerplexityResult:
    """Perplexity over all windows (in order) and per family; every window is full, so no padding."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AllocMoeError(f"batch_size must be a positive integer, got {batch_size!r}")
    N, S = windows.input_ids.shape
    if N == 0 or S < 2:
        raise AllocMoeError(f"need at least one window of >= 2 tokens to measure perplexity, got shape {(N, S)}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # dropout would make the result random
    try:
        nlls = []
        with tqdm(total=N, desc=desc, unit="win", disable=not progress) as bar:
            for i in range(0, N, batch_size):
                ids = windows.input_ids[i : i + batch_size].to(device)  # [b, S]
                nlls.append(window_nll(model, ids).cpu())
                bar.update(ids.shape[0])
    finally:
        if was_training:
            model.train()
    nll = torch.cat(nlls).tolist()  # [N] float64, window order

    # Summing in window order (not per batch) keeps the totals independent of batch_size.
    per_tokens = S - 1
    fam_sum: dict[str, float] = {}
    fam_n: dict[str, int] = {}
    total = 0.0
    for v, fam in zip(nll, windows.families, strict=True):
        total += v
        fam_sum[fam] = fam_sum.get(fam, 0.0) + v
        fam_n[fam] = fam_n.get(fam, 0) + per_tokens
    n_tokens = N * per_tokens
    per_family = {f: (_ppl(fam_sum[f], fam_n[f]), fam_n[f]) for f in sorted(fam_sum)}
    return PerplexityResult(_ppl(total, n_tokens), total, n_tokens, per_family)
