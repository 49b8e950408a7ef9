"""Evaluate a plan on a model: perplexity (overall and per family) and the expert pairs actually computed.

Also records the original model's routing probabilities, which `alloc-moe plan` needs to calibrate top-p / NAEE.
"""

import json
import sys

import torch

from .errors import AllocMoeError
from .io import atomic_write_text, sha256_file


def evaluate_plan(model, windows, plan=None, *, batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of `model` under `plan` (None = original) on `windows`, plus per-layer computed pairs."""
    from .hf_backend import apply
    from .perplexity import perplexity

    with apply(model, plan, stats=True) as handle:
        result = perplexity(model, windows, batch_size=batch_size, progress=progress)
    rows = handle.stats.summary()
    tokens = rows[0]["tokens"] if rows else 0
    pairs = sum(r["computed_pairs"] for r in rows)
    return {
        "ppl": result.ppl,
        "nll_sum": result.nll_sum,
        "n_tokens": result.n_tokens,
        "per_family": {f: {"ppl": p, "n_tokens": n} for f, (p, n) in sorted(result.per_family.items())},
        "tokens_routed": tokens,
        "computed_pairs": pairs,
        "activations_per_token": pairs / tokens if tokens else 0.0,  # summed over MoE layers: the realised budget
        "layers": rows,
    }


def _common_args(p) -> None:
    p.add_argument("--model", required=True, help="hub id or local model directory")
    p.add_argument("--calib", required=True, help="text source: wikitext2, c4, pile, or a local .txt/.jsonl (families from 'family')")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=None, help="cap on evaluated tokens (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--experts-implementation", choices=["eager", "grouped_mm", "batched_mm"], default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def register_cli(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity and computed expert pairs of a model, with or without a plan",
                       description="Perplexity (overall and per family) and expert pairs actually computed per layer.")
    _common_args(p)
    p.add_argument("--plan", help="plan JSON (default: the original model)")
    p.add_argument("--out", help="write the result as JSON")
    p.set_defaults(func=_cmd_ppl)

    r = sub.add_parser("routing", help="record the original model's routing probabilities (for top-p / naee plans)",
                       description="Record each token's top-K_orig routing probabilities per MoE layer.")
    _common_args(r)
    r.add_argument("--out", required=True, help="routing scores file (.pt) for `alloc-moe plan --routing-scores`")
    r.set_defaults(func=_cmd_routing)


def _load(args):
    from .data import load_calibration, tokenize_windows
    from .loading import load_model

    for name in ("seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise AllocMoeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    docs = load_calibration(args.calib)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, experts_implementation=args.experts_implementation,
                            progress=not args.no_progress)
    windows = tokenize_windows(docs, tok, seq_len=args.seq_len, max_tokens=args.max_tokens)
    return model, windows


def _cmd_ppl(args) -> int:
    from .plan import Plan

    plan = Plan.load(args.plan) if args.plan else None  # fail on a bad plan before loading the model
    model, windows = _load(args)
    res = evaluate_plan(model, windows, plan, batch_size=args.batch_size, progress=not args.no_progress)
    from .provenance import environment

    res = {"model": args.model, "plan": args.plan, "plan_sha256": sha256_file(args.plan) if args.plan else None,
           "calib": args.calib, "seq_len": args.seq_len, **res, "environment": environment()}
    label = f"{plan.layer_method} x {plan.token_allocation} B={plan.budget:g}" if plan else "original"
    print(f"{label}: ppl {res['ppl']:.4f} over {res['n_tokens']} tokens; "
          f"{res['activations_per_token']:.3f} expert activations per token over all MoE layers")
    for fam, v in res["per_family"].items():
        print(f"  {fam}: ppl {v['ppl']:.4f} ({v['n_tokens']} tokens)")
    print("  computed pairs per layer: " + " ".join(f"{r['layer']}:{r['computed_pairs']}" for r in res["layers"]))
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
    return 0


def _cmd_routing(args) -> int:
    from .hf_backend import apply
    from .perplexity import perplexity
    from .routing_stats import RoutingStats

    model, windows = _load(args)
    stats = RoutingStats(record_scores=True)
    with apply(model, None, stats=stats):
        perplexity(model, windows, batch_size=args.batch_size, progress=not args.no_progress, desc="routing")
    stats.save_routing_scores(args.out)
    scores = stats.routing_scores()
    n = next(iter(scores.values())).shape[0]
    print(f"wrote {args.out}: {len(scores)} MoE layers x {n} tokens", file=sys.stdout)
    return 0
