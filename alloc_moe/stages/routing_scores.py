"""`alloc-moe routing`: record the original model's top-K_orig routing probabilities per MoE layer, which
`alloc-moe plan` needs to calibrate the top-p / NAEE thresholds to a budget (Appendix A.1)."""

import sys

from .ppl import add_text_args, load_model_and_windows


def register_cli(sub) -> None:
    r = sub.add_parser("routing", help="record the original model's routing probabilities (for top-p / naee plans)",
                       description="Record each token's top-K_orig routing probabilities per MoE layer.")
    add_text_args(r)
    r.add_argument("--out", required=True, help="routing scores file (.pt) for `alloc-moe plan --routing-scores`")
    r.set_defaults(func=_cmd_routing)


def _cmd_routing(args) -> int:
    from ..backends.hf.apply import apply
    from ..backends.hf.perplexity import perplexity
    from ..backends.hf.stats import RoutingStats

    model, windows = load_model_and_windows(args)
    stats = RoutingStats(record_scores=True)
    with apply(model, None, stats=stats):
        perplexity(model, windows, batch_size=args.batch_size, progress=not args.no_progress, desc="routing")
    stats.save_routing_scores(args.out)
    scores = stats.routing_scores()
    n = next(iter(scores.values())).shape[0]
    print(f"wrote {args.out}: {len(scores)} MoE layers x {n} tokens", file=sys.stdout)
    return 0
