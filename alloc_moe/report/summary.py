"""Tidy result tables (accuracy, perplexity) and the paper's Tables 2-4 from the JSON files of `alloc-moe eval`."""

import json
import math
from pathlib import Path

import pandas as pd

from ..errors import AllocMoeError
from ..io import atomic_path


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Byte-stable CSV: fixed float format, no index, written atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f", lineterminator="\n")


# ---- accuracy (rows from `alloc-moe eval` JSON files) ----------------------------------------------------------
ACCURACY_COLUMNS = ["model", "layer_method", "token_allocation", "k_base", "budget", "calibration", "backend", "task",
                    "group", "metric", "value", "stderr", "seed"]
KEY_COLUMNS = ["model", "layer_method", "token_allocation", "k_base", "budget", "calibration", "backend", "task",
               "seed"]


def eval_files(paths: list[str | Path]) -> list[Path]:
    """The eval JSONs behind `paths`: a folder (an accuracy job's output, results/<run>/eval/<label>/) stands for its
    `*.json` files in name order, a file for itself."""
    out = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return out


def accuracy_table(evals: list[str | Path]) -> pd.DataFrame:
    """All rows of the eval JSONs (files or directories of them), sorted on the key columns (byte-stable CSV)."""
    rows = [r for p in eval_files(evals) for r in json.loads(Path(p).read_text())["rows"]]
    df = pd.DataFrame(rows, columns=ACCURACY_COLUMNS)
    df["k_base"] = df["k_base"].astype("string")
    return df.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)


def eval_perplexity_table(evals: list[str | Path]) -> pd.DataFrame:
    """Perplexity per family (and 'all') recorded by `alloc-moe eval --perplexity`, with the change vs original."""
    rows = []
    for p in eval_files(evals):
        d = json.loads(Path(p).read_text())
        if "perplexity" not in d:
            continue
        head = d["rows"][0]
        ppl = d["perplexity"]
        fams = {"all": (ppl["ppl"], ppl["n_tokens"]), **{f: (v["ppl"], v["n_tokens"]) for f, v in ppl["per_family"].items()}}
        for fam, (value, n) in fams.items():
            rows.append({**{k: head[k] for k in ("model", "layer_method", "token_allocation", "k_base", "budget",
                                                 "calibration", "seed")},
                         "family": fam, "ppl": value, "n_tokens": n,
                         "activations_per_token": ppl["activations_per_token"]})
    df = pd.DataFrame(rows)
    if df.empty:  # no perplexity recorded (models on the vllm backend): the table's header only
        return pd.DataFrame(columns=["model", "method", "layer_method", "token_allocation", "k_base", "budget",
                                     "calibration", "seed", "family", "ppl", "n_tokens", "activations_per_token",
                                     "ppl_change_pct"])
    df["k_base"] = df["k_base"].astype("string")
    df.insert(1, "method", method_names(df))
    base = df[df.layer_method == "original"].set_index(["model", "seed", "family"])["ppl"]
    df["ppl_change_pct"] = [100.0 * (r.ppl / base[(r.model, r.seed, r.family)] - 1.0) for r in df.itertuples()]
    keys = ["model", "layer_method", "token_allocation", "k_base", "budget", "calibration", "seed", "family"]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


# Display names of the paper's methods: (layer_method, token_allocation) -> name
METHOD_NAMES = {
    ("original", "topk"): "Original", ("uniform", "topk"): "Uniform", ("ascending", "topk"): "Ascending",
    ("descending", "topk"): "Descending", ("lexi", "topk"): "LExI", ("alloc-l", "topk"): "Alloc-L",
    ("uniform", "alloc-t"): "Alloc-T", ("uniform", "top-p"): "Dynamic-MoE", ("uniform", "naee"): "NAEE",
    ("alloc-l", "alloc-t"): "Alloc-MoE",
}
# paper figure / table -> the methods it compares (names above)
COMPARISONS = {
    "fig3": ["Uniform", "LExI", "Dynamic-MoE", "NAEE", "Alloc-MoE"],
    "fig4": ["Uniform", "Ascending", "Descending", "LExI", "Alloc-L"],
    "fig6": ["Uniform", "Dynamic-MoE", "NAEE", "Alloc-T"],
    "table4": {"Uniform": "Uniform", "+L": "Alloc-L", "+T": "Alloc-T", "+L+T": "Alloc-MoE"},
}


def method_names(df: pd.DataFrame) -> list[str]:
    """The display name of each row's (layer_method, token_allocation); 'layer+token' for a pair the paper lacks."""
    return [METHOD_NAMES.get((a, b), f"{a}+{b}") for a, b in zip(df.layer_method, df.token_allocation)]


def group_table(acc: pd.DataFrame, *, k_base: int = 1, calibration: str | None = None) -> pd.DataFrame:
    """Group scores (mean of the group's tasks, SE sqrt(sum se^2)/n) per method, budget and seed; one method per
    (layer, token) at the default k_base and calibration set (what Figs. 3/4/6 and Table 4 compare)."""
    df = acc.copy()
    kb = df["k_base"].fillna("")
    df = df[(df.token_allocation != "alloc-t") | (kb == str(k_base))]
    if calibration is not None:
        df = df[df.calibration.isin(["", "none", calibration])]
    df = df.assign(method=method_names(df))
    return combine(df, ["model", "method", "budget", "seed", "group"])


def combine(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean `value` over the rows of each `by` group with SE sqrt(sum se^2) / n (independent estimates): a group
    score from its tasks, the paper's 'averaged across three task groups', or a mean over training seeds."""
    import math

    return (df.groupby(by, sort=True)
              .agg(value=("value", "mean"), stderr=("stderr", lambda s: math.sqrt((s ** 2).sum()) / len(s)))
              .reset_index())


def tradeoff_table(acc: pd.DataFrame, lat: pd.DataFrame, *, k_base: int, calibration: str) -> pd.DataFrame:
    """The paper's Fig. 1 view: for every (model, method, budget) that has both an accuracy and a latency
    measurement, the mean of the group scores (± SE, as in Table 4) against the measured speedup over the original
    model, per latency phase. The original model is the (model, Original, L x K_orig) row at speedup 1.

    `acc`: accuracy.csv rows; `lat`: latency.csv rows (`latency.speedup_frame` columns + seed). Methods are matched
    by (layer_method, token_allocation) at the default `k_base` and `calibration` (the plans the latency rule
    measures); plans evaluated but not timed, or timed but not evaluated, are left out. Over training seeds: score
    and SE by `combine`, speedup the mean of the per-seed speedups (and of their interval ends), resolved when every
    seed's speedup is, `seeds` how many seeds had both.
    Returns columns model, method, budget, phase, value, stderr, speedup, speedup_lo, speedup_hi, resolved, seeds
    (one row per key)."""
    keys = ["model", "method", "budget", "seed"]
    score = combine(group_table(acc, k_base=k_base, calibration=calibration), keys)
    lat = lat.assign(method=method_names(lat))
    repeated = lat[lat.duplicated([*keys, "phase"], keep=False)]
    if not repeated.empty:
        r = repeated.iloc[0]
        raise AllocMoeError(f"the latency table times {r.method} at B={r.budget:g} ({r.phase}, seed {r.seed}) more than "
                            "once (plans " + ", ".join(sorted(set(repeated.plan))) + "); allowed: one plan per "
                            "method, budget and seed, as the latency rule measures")
    for col in ("speedup_lo", "speedup_hi", "resolved"):  # latency tables written before the intervals lack them
        if col not in lat:
            lat = lat.assign(**{col: float("nan") if col != "resolved" else None})
    lat = lat.assign(resolved=lat["resolved"].map(lambda v: bool(v) if str(v) in ("True", "False") else None))
    joined = score.merge(lat[[*keys, "phase", "speedup", "speedup_lo", "speedup_hi", "resolved"]], on=keys,
                         how="inner")
    by = ["model", "method", "budget", "phase"]
    speed = joined.groupby(by, sort=True).agg(
        speedup=("speedup", "mean"), speedup_lo=("speedup_lo", "mean"), speedup_hi=("speedup_hi", "mean"),
        resolved=("resolved", lambda s: None if s.isna().any() else bool(s.all())),
        seeds=("seed", "nunique")).reset_index()
    return combine(joined, by).merge(speed, on=by)


def _markdown(rows: pd.DataFrame, label: str, order: list, budgets: list[float], title: str) -> str:
    """rows: columns [label, budget, value, stderr] (seed-averaged); one line per label, a column per budget + Avg."""
    head = f"| {label} | " + " | ".join(f"B={b:g}" for b in budgets) + " | Avg. |"
    lines = [f"**{title}**", "", head, "|---" * (len(budgets) + 2) + "|"]
    for name in order:
        r = rows[rows[label] == name].set_index("budget")
        cells = [f"{r.loc[b, 'value']:.2f} ± {r.loc[b, 'stderr']:.2f}" if b in r.index else "n/a" for b in budgets]
        avg = f"{r['value'].mean():.2f}" if len(r) == len(budgets) else "n/a"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def paper_tables(acc: pd.DataFrame, *, k_base: int, calibration: str, k_base_sweep: list[int] | None = None) -> dict[str, str]:
    """Markdown for the paper's Tables 2 (K_base under Uniform), 3 (calibration set, Alloc-L), 4 (ablation).
    `k_base_sweep` lists Table 2's rows (a K_base no budget can meet shows as n/a); default: those evaluated."""
    out = {}
    for model in sorted(acc.model.unique()):
        a = acc[acc.model == model]
        budgets = sorted(a[a.layer_method != "original"].budget.unique())
        # Table 2: uniform x alloc-t at each K_base
        t2 = a[(a.layer_method == "uniform") & (a.token_allocation == "alloc-t")]
        g2 = combine(combine(combine(t2, ["k_base", "budget", "seed", "group"]), ["k_base", "budget", "seed"]),
                     ["k_base", "budget"])
        kbs = [str(k) for k in k_base_sweep] if k_base_sweep else sorted(g2.k_base.unique(), key=int)
        out[f"table2_{model}"] = _markdown(g2, "k_base", kbs, budgets,
                                           f"Table 2 ({model}): K_base in Alloc-T under Uniform; mean of the 3 group "
                                           "scores ± SE; n/a: K_base > B/L")
        # Table 3: alloc-l x topk per calibration set
        t3 = a[(a.layer_method == "alloc-l") & (a.token_allocation == "topk")]
        g3 = combine(combine(combine(t3, ["calibration", "budget", "seed", "group"]), ["calibration", "budget", "seed"]),
                     ["calibration", "budget"])
        out[f"table3_{model}"] = _markdown(g3, "calibration", sorted(g3.calibration.unique()), budgets,
                                           f"Table 3 ({model}): calibration set of Alloc-L's sensitivity profile")
        # Table 4: Uniform / +L / +T / +L+T
        g = group_table(a, k_base=k_base, calibration=calibration)
        g4 = combine(combine(g, ["method", "budget", "seed"]), ["method", "budget"])
        names = COMPARISONS["table4"]
        g4 = g4[g4.method.isin(names.values())].assign(method=lambda d: d.method.map({v: k for k, v in names.items()}))
        out[f"table4_{model}"] = _markdown(g4, "method", list(names), budgets,
                                           f"Table 4 ({model}): ablation of Alloc-L (+L) and Alloc-T (+T)")
    return out



def _spread(v: pd.Series, fmt: str) -> str:
    """'mean [min..max]' over seeds (just the mean for one value, n/a for none)."""
    if v.empty:
        return "n/a"
    return f"{v.mean():{fmt}} [{v.min():{fmt}}..{v.max():{fmt}}]" if len(v) > 1 else f"{v.mean():{fmt}}"


def _score(g: pd.DataFrame, method: str, budget: float, seed, group: str | None) -> tuple[float, float]:
    """(score, SE) of one method at one budget and seed: a group score, or the mean of the groups (group None)."""
    d = g[(g.method == method) & (g.budget == budget) & (g.seed == seed)]
    d = d if group is None else d[d.group == group]
    if d.empty:
        return float("nan"), float("nan")
    row = combine(d.assign(one=0), ["one"]).iloc[0]  # the project's SE rule for a mean of independent scores
    return row.value, row.stderr


def uniform_loss(g: pd.DataFrame, group: str | None, seeds: list, orig_budget: float,
                 budget: float) -> dict:
    """seed -> (Original - Uniform at `budget`, SE of the original's score, Uniform's score), for one group (None:
    the mean of the groups)."""
    out = {}
    for s_ in seeds:
        (o, se), (u, _) = _score(g, "Original", orig_budget, s_, group), _score(g, "Uniform", budget, s_, group)
        out[s_] = (o - u, se, u)
    return out


def recovered_shares(g: pd.DataFrame, method: str, group: str | None, losses: dict, budget: float) -> list[float]:
    """Per seed, the share of Uniform's loss that `method` recovers, (method - Uniform) / (Original - Uniform); only
    seeds where Uniform loses at least the original's SE (below that the ratio divides by noise)."""
    shares = []
    for s_, (loss, se, u) in losses.items():
        x, _ = _score(g, method, budget, s_, group)
        if loss >= se and loss > 0 and not math.isnan(x):
            shares.append((x - u) / loss)
    return shares


def fidelity_report(acc: pd.DataFrame, ppl: pd.DataFrame, *, k_base: int, calibration: str) -> str:
    """The README's fidelity study: per method and budget, mean and spread (min..max) over training seeds of each
    group score and of the perplexity change per family; and the share of Uniform's loss vs the original model that
    +L, +T and +L+T recover at half budget (B = L * K_orig / 2)."""
    lines = []
    for model in sorted(acc.model.unique()):
        g = group_table(acc[acc.model == model], k_base=k_base, calibration=calibration)
        seeds = sorted(int(s_) for s_ in g.seed.unique())
        lines += [f"### {model}: {len(seeds)} training seed(s) {seeds}", "",
                  "Group scores in points: mean over seeds [min..max]; chance and SE per seed are in accuracy.csv.", ""]
        budgets = sorted(g[g.method != "Original"].budget.unique())
        groups = [x for x in ("NLU", "Reasoning", "Math") if x in set(g.group)]
        lines.append("| method | B | " + " | ".join(groups) + " |")
        lines.append("|---" * (len(groups) + 2) + "|")
        order = ["Original", "Uniform", "Ascending", "Descending", "LExI", "Alloc-L", "Dynamic-MoE", "NAEE", "Alloc-T",
                 "Alloc-MoE"]
        for m in order:
            for b in (budgets if m != "Original" else sorted(g[g.method == m].budget.unique())):
                d = g[(g.method == m) & (g.budget == b)]
                if d.empty:
                    continue
                cells = [_spread(d[d.group == grp].value, ".2f") for grp in groups]
                lines.append(f"| {m} | {b:g} | " + " | ".join(cells) + " |")
        # recovery of Uniform's loss, at half budget (the question) and at the lowest budget
        orig_b = g[g.method == "Original"].budget.max()
        for at in dict.fromkeys([orig_b / 2, min(budgets)]):
            lines += ["", (f"Share of Uniform's loss (Original - Uniform) recovered at B={at:g}: (method - Uniform) / "
                           "(Original - Uniform) per seed, then mean [min..max] over the seeds where Uniform loses at "
                           "least the original's standard error (their number in parentheses; n/a: none); 1 = all of "
                           "it, 0 = none, < 0 = worse than Uniform:"), "",
                      "| variant | " + " | ".join([*groups, "mean of groups"]) + " |", "|---" * (len(groups) + 2) + "|"]
            losses = [uniform_loss(g, grp, seeds, orig_b, at) for grp in [*groups, None]]
            lines.append("| Uniform's loss (points) | " + " | ".join(
                _spread(pd.Series([v[0] for v in per_seed.values()]), ".2f") for per_seed in losses) + " |")
            for label, m in (("+L", "Alloc-L"), ("+T", "Alloc-T"), ("+L+T", "Alloc-MoE")):
                cells = []
                for grp, per_seed in zip([*groups, None], losses):
                    shares = recovered_shares(g, m, grp, per_seed, at)
                    cells.append(f"{_spread(pd.Series(shares), '.2f')} ({len(shares)})" if shares else "n/a")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        # perplexity change per family
        p = ppl[(ppl.model == model) & (ppl.method.isin(["Uniform", "Alloc-L", "Alloc-T", "Alloc-MoE", "LExI",
                                                          "Dynamic-MoE", "NAEE"]))]
        p = p[(p.token_allocation != "alloc-t") | (p.k_base == str(k_base))]
        p = p[p.calibration.isin(["", "none", calibration])]
        fams = [f for f in ("all", "language", "patterns", "arithmetic") if f in set(p.family)]
        lines += ["", "Perplexity change vs the original model (%), held-out text: mean over seeds [min..max]", "",
                  "| method | B | " + " | ".join(fams) + " |", "|---" * (len(fams) + 2) + "|"]
        for m in [x for x in order if x in set(p.method)]:
            for b in budgets:
                d = p[(p.method == m) & (p.budget == b)]
                if d.empty:
                    continue
                cells = [_spread(d[d.family == f].ppl_change_pct, "+.2f") for f in fams]
                lines.append(f"| {m} | {b:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"
