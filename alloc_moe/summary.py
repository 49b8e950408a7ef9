"""Tidy result tables from the per-run JSON files of `alloc-moe ppl`."""

import json
from pathlib import Path

import pandas as pd

from .io import atomic_path

COLUMNS = ["method", "layer_method", "token_allocation", "budget", "family", "ppl", "ppl_change_pct",
           "n_tokens", "activations_per_token", "computed_pairs"]


def perplexity_table(original: str | Path, plans: list[str | Path]) -> pd.DataFrame:
    """One row per (method, budget, family); family 'all' is the whole evaluation text.

    `ppl_change_pct` is relative to the original model on the same family; `activations_per_token` is the realised
    global budget (expert pairs computed per token, summed over MoE layers).
    """
    base = json.loads(Path(original).read_text())
    base_ppl = {"all": base["ppl"], **{f: v["ppl"] for f, v in base["per_family"].items()}}
    rows = []
    for run in [base] + [json.loads(Path(p).read_text()) for p in plans]:
        if run.get("plan"):
            plan = json.loads(Path(run["plan"]).read_text())
            layer, token, budget = plan["layer_method"], plan["token_allocation"], plan["budget"]
            method = f"{layer}+{token}"
        else:
            layer, token, budget, method = "original", "topk", run["activations_per_token"], "original"
        fams = {"all": (run["ppl"], run["n_tokens"]), **{f: (v["ppl"], v["n_tokens"]) for f, v in run["per_family"].items()}}
        for fam, (ppl, n) in fams.items():
            rows.append({
                "method": method, "layer_method": layer, "token_allocation": token, "budget": float(budget),
                "family": fam, "ppl": ppl, "ppl_change_pct": 100.0 * (ppl / base_ppl[fam] - 1.0), "n_tokens": n,
                "activations_per_token": run["activations_per_token"], "computed_pairs": run["computed_pairs"],
            })
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values(["family", "budget", "method"], kind="stable").reset_index(drop=True)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Byte-stable CSV: fixed float format, no index, written atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f", lineterminator="\n")
