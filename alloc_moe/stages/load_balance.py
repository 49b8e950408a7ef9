"""Expert-load fidelity of a plan (the paper's section 4.4 and Fig. 12b): original vs plan, per MoE layer.

Metrics on plain per-expert load vectors (`compare`):
- `spearman`: Spearman rank correlation of the two load vectors (average ranks for ties; NaN if one is constant),
- `entropy_a`, `entropy_b`, `entropy_delta` (= b - a): normalised entropy H(p) / log(E) of the load distribution
  p = load / sum(load), in [0, 1] (1 = perfectly balanced),
- `js_divergence`: Jensen-Shannon divergence of the two load distributions, base 2 (in [0, 1]).

Collected from the HF backend's routing statistics while a text source runs through the model: per layer the
computed pairs per expert (`loads`), the routing weights of those pairs summed per expert (`weighted_loads`, the
"weighted load distribution" whose JS divergence is `js_divergence_weighted`), and every token's expert count and
routing entropy, whose Spearman correlation is `experts_entropy_spearman` (Alloc-T: fewer experts for confident,
low-entropy tokens; NaN when every token has the same count, as in top-k plans).
"""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ..core.plan import ORIGINAL, Plan
from ..errors import AllocMoeError

METRIC_COLUMNS = ["model", "plan", "layer_method", "token_allocation", "budget", "layer", "metric", "value"]
LOAD_COLUMNS = ["model", "plan", "layer", "expert", "load", "weighted_load"]
TOKEN_COLUMNS = ["model", "plan", "layer", "experts", "tokens", "entropy_mean", "entropy_q25", "entropy_median",
                 "entropy_q75"]


# ------------------------------------------------------------------------------------------------ metrics


def _vector(x, name: str) -> np.ndarray:
    v = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise AllocMoeError(f"{name} must be a 1-D vector of at least 2 expert loads, got shape {v.shape}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise AllocMoeError(f"{name} must hold finite non-negative loads")
    if v.sum() <= 0:
        raise AllocMoeError(f"{name} has no load (all zero)")
    return v


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Pearson correlation of the average ranks; NaN when either vector is constant."""
    ra, rb = rankdata(np.asarray(a, dtype=np.float64)), rankdata(np.asarray(b, dtype=np.float64))
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / denom) if denom > 0 else math.nan


def normalized_entropy(p: np.ndarray) -> float:
    """H(p) / log(len(p)) of a probability vector."""
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(len(p)))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits: (KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2."""
    m = (p + q) / 2

    def kl(x):
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return max(0.0, (kl(p) + kl(q)) / 2)


def compare(loads_a, loads_b) -> dict:
    """Load-balance metrics between two per-expert load vectors of one layer (e.g. original `a`, plan `b`)."""
    a, b = _vector(loads_a, "loads_a"), _vector(loads_b, "loads_b")
    if a.shape != b.shape:
        raise AllocMoeError(f"load vectors differ in length: {a.size} vs {b.size} experts")
    p, q = a / a.sum(), b / b.sum()
    ea, eb = normalized_entropy(p), normalized_entropy(q)
    return {"spearman": spearman(a, b), "entropy_a": ea, "entropy_b": eb, "entropy_delta": eb - ea,
            "js_divergence": js_divergence(p, q)}


# ------------------------------------------------------------------------------------------------ collection


@dataclasses.dataclass
class LayerRouting:
    loads: np.ndarray  # [E] computed pairs per expert
    weighted_loads: np.ndarray  # [E] summed routing weights of the computed pairs
    experts: np.ndarray  # [N] experts computed per token
    entropy: np.ndarray  # [N] routing entropy (nats) per token


def collect(model, windows, plan: Plan | None = None, *, batch_size: int = 8, progress: bool = False) -> dict[int, LayerRouting]:
    """Run `windows` through `model` under `plan` (None = original); per MoE layer (decoder index) what was routed."""
    from ..backends.hf.apply import apply
    from ..backends.hf.perplexity import perplexity
    from ..backends.hf.stats import RoutingStats

    stats = RoutingStats(record_entropy=True, record_tokens=True)
    with apply(model, plan, stats=stats):
        perplexity(model, windows, batch_size=batch_size, progress=progress, desc="load-balance")
    return {layer: LayerRouting(
        loads=stats.loads[layer].cpu().numpy().astype(np.float64),
        weighted_loads=stats.weighted_loads[layer].cpu().numpy(),
        experts=torch.cat(stats.token_counts[layer]).numpy(),
        entropy=torch.cat(stats.entropy[layer]).double().numpy(),
    ) for layer in sorted(stats.loads)}


def layer_metrics(original: LayerRouting, planned: LayerRouting) -> dict[str, float]:
    """One layer's metrics, original vs plan."""
    c = compare(original.loads, planned.loads)
    return {
        "spearman": c["spearman"],
        "entropy_original": c["entropy_a"],
        "entropy_plan": c["entropy_b"],
        "entropy_delta": c["entropy_delta"],
        "js_divergence": c["js_divergence"],
        "js_divergence_weighted": compare(original.weighted_loads, planned.weighted_loads)["js_divergence"],
        "experts_per_token": float(planned.experts.mean()),
        "experts_entropy_spearman": spearman(planned.experts, planned.entropy),
    }


def tables(model_name: str, runs: dict[str, tuple[Plan | None, dict[int, LayerRouting]]]):
    """(metrics, loads, tokens) tidy DataFrames from {label: (plan, collect(...))}; the original is the reference."""
    import pandas as pd

    base = runs[ORIGINAL][1]
    metrics, loads, tokens = [], [], []
    for label, (plan, routing) in runs.items():
        if plan is not None:
            fields = {"layer_method": plan.layer_method, "token_allocation": plan.token_allocation, "budget": plan.budget}
            for layer, lr in routing.items():
                for metric, value in layer_metrics(base[layer], lr).items():
                    metrics.append({"model": model_name, "plan": label, **fields, "layer": layer, "metric": metric, "value": value})
        for layer, lr in routing.items():
            loads += [{"model": model_name, "plan": label, "layer": layer, "expert": e, "load": int(lr.loads[e]),
                       "weighted_load": float(lr.weighted_loads[e])} for e in range(len(lr.loads))]
            for n in np.unique(lr.experts):
                ent = lr.entropy[lr.experts == n]
                q25, med, q75 = np.quantile(ent, [0.25, 0.5, 0.75])
                tokens.append({"model": model_name, "plan": label, "layer": layer, "experts": int(n), "tokens": int(ent.size),
                               "entropy_mean": float(ent.mean()), "entropy_q25": q25, "entropy_median": med, "entropy_q75": q75})
    return (pd.DataFrame(metrics, columns=METRIC_COLUMNS), pd.DataFrame(loads, columns=LOAD_COLUMNS),
            pd.DataFrame(tokens, columns=TOKEN_COLUMNS))


# ------------------------------------------------------------------------------------------------ CLI


def register_cli(sub) -> None:
    from .ppl import add_text_args

    p = sub.add_parser("load-balance", help="expert-load fidelity of plans vs the original (Spearman, entropy, JS)",
                       description="Per MoE layer: Spearman correlation of expert loads, normalised-entropy delta, "
                                   "Jensen-Shannon divergence, experts per token vs routing entropy; original vs each plan.")
    add_text_args(p)
    p.add_argument("--plans", nargs="+", required=True, metavar="PLAN", help="plan JSON files (the original is always run)")
    p.add_argument("--model-name", default=None, help="value of the 'model' column (default: the --model directory name)")
    p.add_argument("--out", required=True, help="tidy metrics CSV: model, plan, ..., layer, metric, value")
    p.add_argument("--loads", default=None, help="also write per-expert loads (CSV) for the load-distribution figure")
    p.add_argument("--tokens", default=None, help="also write routing entropy by experts per token (CSV)")
    p.set_defaults(func=_cmd_load_balance)


def _cmd_load_balance(args) -> int:
    from ..backends.hf.model import check_plans_fit_model_dir
    from ..core.plan import labelled_plans
    from ..report.summary import write_csv
    from .ppl import load_model_and_windows

    for out in (args.out, args.loads, args.tokens):
        if out is not None and Path(out).is_dir():
            raise AllocMoeError(f"output {out} is a directory; give a CSV file name")
    plans = labelled_plans(args.plans)
    check_plans_fit_model_dir(args.model, plans)
    model, windows = load_model_and_windows(args)
    runs = {label: (plan, collect(model, windows, plan, batch_size=args.batch_size, progress=not args.no_progress))
            for label, plan in plans}
    name = args.model_name or Path(args.model.rstrip("/")).name
    metrics, loads, tokens = tables(name, runs)
    write_csv(metrics, args.out)
    if args.loads:
        write_csv(loads, args.loads)
    if args.tokens:
        write_csv(tokens, args.tokens)
    wide = metrics.pivot_table(index="plan", columns="metric", values="value", aggfunc="mean", sort=False).reindex(
        columns=["spearman", "entropy_delta", "js_divergence", "experts_per_token", "experts_entropy_spearman"])  # all-NaN kept
    for label, row in wide.iterrows():
        print(f"  {label:<28} spearman {row['spearman']:.3f}  entropy delta {row['entropy_delta']:+.4f}  "
              f"JS {row['js_divergence']:.4f}  experts/token {row['experts_per_token']:.2f}  "
              f"experts~entropy {row['experts_entropy_spearman']:.3f}  (means over layers)", file=sys.stdout)
    print(f"wrote {args.out}")
    return 0
