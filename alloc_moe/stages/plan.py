"""`alloc-moe plan` and `alloc-moe show`: allocate a budget and write a plan; print a plan as a table."""

import argparse

from ..errors import AllocMoeError


def _parse_layers(text: str) -> list[int]:
    """'1-26' or '0,2,4' -> decoder-layer indices."""
    out = []
    try:
        for part in text.split(","):
            a, _, b = part.partition("-")
            out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like '1-26' or '0,2,4', got {text!r}") from None
    return out


def _cmd_plan(args) -> int:
    import shlex

    from .. import __version__
    from ..core.plan import build_plan
    from ..core.sensitivity import read_sensitivity
    from ..io import sha256_file

    provenance = {"package_version": __version__, "command": shlex.join(["alloc-moe", *args.argv])}
    if args.calibration:
        provenance["calibration"] = args.calibration
    S = None
    if args.sensitivity:
        layers, S = read_sensitivity(args.sensitivity)
        provenance["sensitivity_sha256"] = sha256_file(args.sensitivity)
        k_orig = S.shape[1]
        if args.moe_layers and args.moe_layers != layers:
            raise AllocMoeError(f"--moe-layers {args.moe_layers} disagree with the sensitivity file's layers {layers}")
    elif args.moe_layers and args.k_orig:
        layers, k_orig = args.moe_layers, args.k_orig
    else:
        raise AllocMoeError("give --sensitivity S.csv, or --moe-layers and --k-orig for the data-free methods")
    routing = None
    if args.routing_scores:
        from ..backends.hf.stats import load_routing_scores, routing_scores_sha256

        routing = load_routing_scores(args.routing_scores)
        provenance["routing_scores_content_sha256"] = routing_scores_sha256(routing)  # the file's bytes vary per save
    plan = build_plan(
        method=args.method, budget=args.budget, moe_layers=layers, k_orig=k_orig, sensitivity=S,
        token_allocation=args.token_allocation, k_base=args.k_base, normalization=args.normalization,
        routing_scores=routing, model=args.model, provenance=provenance, exact_budget=args.exact_budget,
    )
    plan.save(args.out)
    print(f"wrote {args.out}: {args.method} x {args.token_allocation}, budget {plan.budget:g}, "
          f"K per layer {plan.k_per_layer}")
    return 0


def _cmd_show(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..core.plan import Plan

    plan = Plan.load(args.plan)
    table = Table(title=f"{plan.model}: {plan.layer_method} x {plan.token_allocation}, budget {plan.budget:g}")
    table.add_column("MoE layer", justify="right")
    table.add_column("decoder layer", justify="right")
    table.add_column("K", justify="right")
    if plan.thresholds:
        table.add_column("p" if plan.token_allocation == "top-p" else "beta", justify="right")
    for i, (layer, k) in enumerate(zip(plan.moe_layers, plan.k_per_layer)):
        row = [str(i), str(layer), f"{k:g}"]
        if plan.thresholds:
            row.append(f"{plan.thresholds[i]:.4f}")
        table.add_row(*row)
    console = Console()
    console.print(table)
    extra = f", k_base {plan.k_base}" if plan.token_allocation == "alloc-t" else ""
    console.print(f"sum of K = {sum(plan.k_per_layer):g} of budget {plan.budget:g} "
                  f"(K_orig {plan.k_orig} x {plan.num_layers} layers = {plan.k_orig * plan.num_layers}){extra}")
    return 0


def register_cli(sub) -> None:
    from ..core.layer_alloc import LAYER_METHODS, NORMALIZATIONS
    from ..core.plan import TOKEN_ALLOCATIONS

    p = sub.add_parser("plan", help="allocate a global activation budget over the MoE layers and write a plan JSON",
                       description="Allocate a global activation budget B over a model's MoE layers and write a plan.")
    p.add_argument("--sensitivity", metavar="S.csv", help="long CSV with header layer,k,value (from `alloc-moe profile`)")
    p.add_argument("--budget", type=float, required=True, help="global budget B = sum over MoE layers of activations per token")
    p.add_argument("--method", choices=list(LAYER_METHODS), required=True, help="layer-level allocation method")
    p.add_argument("--token-allocation", choices=list(TOKEN_ALLOCATIONS), default="topk", help="token-level mode (default: topk)")
    p.add_argument("--k-base", type=int, default=1, help="alloc-t: experts every token keeps (default: 1)")
    p.add_argument("--normalization", choices=list(NORMALIZATIONS), default=None,
                   help="alloc-l: sensitivity row normalisation (default: relative)")
    p.add_argument("--exact-budget", action="store_true",
                   help="alloc-l/lexi: spend exactly floor(B) (default: at most B, as in the paper's eq. 4)")
    p.add_argument("--routing-scores", metavar="FILE.pt", help="top-p/naee: recorded routing probabilities to calibrate thresholds on")
    p.add_argument("--moe-layers", type=_parse_layers, help="decoder indices of the MoE layers, e.g. 1-26 (data-free methods)")
    p.add_argument("--k-orig", type=int, help="the model's original top-k (data-free methods)")
    p.add_argument("--model", default="unspecified", help="model id or path recorded in the plan")
    p.add_argument("--calibration", default=None,
                   help="label of the calibration data the sensitivity / routing scores came from (recorded in the plan)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.set_defaults(func=_cmd_plan)

    s = sub.add_parser("show", help="print a plan as a per-layer table", description="Print a plan as a per-layer table.")
    s.add_argument("plan", help="plan JSON")
    s.set_defaults(func=_cmd_show)
