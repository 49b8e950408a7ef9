"""`alloc-moe ppl`: perplexity (overall and per family) of a model under a plan, and the expert pairs computed.

`add_text_args` / `load_model_and_windows` are the model-on-text arguments and loading that `alloc-moe routing`
(stages/routing_scores.py) and `alloc-moe load-balance` share.
"""

import json

import torch

from ..backends.dtypes import DTYPE_HELP
from ..errors import AllocMoeError
from ..io import atomic_write_text, sha256_file


def evaluate_plan(model, windows, plan=None, *, batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of `model` under `plan` (None = original) on `windows`, plus per-layer computed pairs."""
    from ..backends.hf.apply import apply
    from ..backends.hf.perplexity import perplexity

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


def add_text_args(p) -> None:
    """--model, --calib and the windowing / device options of the commands that run a model over text."""
    p.add_argument("--model", required=True, help="hub id or local model directory")
    p.add_argument("--calib", required=True, help="text source: wikitext2, c4, pile, or a local .txt/.jsonl (families from 'family')")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=None, help="cap on evaluated tokens (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--experts-implementation", choices=["eager", "grouped_mm", "batched_mm"], default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def register_cli(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity and computed expert pairs of a model, with or without a plan",
                       description="Perplexity (overall and per family) and expert pairs actually computed per layer.")
    add_text_args(p)
    p.add_argument("--plan", help="plan JSON (default: the original model)")
    p.add_argument("--out", help="write the result as JSON")
    p.set_defaults(func=_cmd_ppl)


def load_model_and_windows(args):
    """(model, token windows) for `add_text_args`' options; one-line errors for bad sizes."""
    from ..backends.hf.loading import load_model
    from ..data.text import load_calibration, tokenize_windows

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
    from ..core.plan import Plan

    plan = Plan.load(args.plan) if args.plan else None  # fail on a bad plan before loading the model
    model, windows = load_model_and_windows(args)
    res = evaluate_plan(model, windows, plan, batch_size=args.batch_size, progress=not args.no_progress)
    from ..harness.provenance import environment

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
