"""Seaborn figures of the result tables."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ..io import atomic_path  # noqa: E402


def perplexity_vs_budget(df: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Perplexity change vs the original model, against the global budget, one panel per text family
    (`summary.eval_perplexity_table` rows; seeds are averaged with a 95% CI band when there are several)."""
    data = df[df["method"] != "Original"]
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(data=data, x="budget", y="ppl_change_pct", hue="method", style="method", col="family",
                    kind="line", markers=True, dashes=False, height=3.0, aspect=1.1,
                    facet_kws={"sharey": False}, col_order=sorted(data["family"].unique(), key=lambda f: (f != "all", f)))
    g.set_axis_labels("global budget B (activations per token)", "perplexity change vs original (%)")
    if title:
        g.figure.suptitle(title, y=1.03)
    with atomic_path(path) as tmp:
        g.figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(g.figure)


def group_scores_vs_budget(g: pd.DataFrame, methods: list[str], path: str | Path, title: str = "") -> None:
    """The paper's Figs. 3/4/6: each group's score against the global budget, one line per method with ± SE bars,
    the original model as a dashed line. `g`: rows of `summary.group_table` (seed-averaged or one seed)."""
    from .summary import combine

    g = combine(g, ["method", "budget", "group"])
    orig = g[g.method == "Original"]
    data = g[g.method.isin(methods)]
    groups = [x for x in ("NLU", "Reasoning", "Math") if x in set(data.group)] + sorted(set(data.group) - {"NLU", "Reasoning", "Math"})
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 2.9), squeeze=False)
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    for ax, grp in zip(axes[0], groups):
        for m in methods:
            d = data[(data.method == m) & (data.group == grp)].sort_values("budget")
            if not d.empty:
                ax.errorbar(d.budget, d.value, yerr=d.stderr, label=m, color=palette[m], marker="o", ms=3.5,
                            capsize=2, lw=1.3)
        o = orig[orig.group == grp]
        if not o.empty:
            ax.axhline(o.value.iloc[0], color="black", ls="--", lw=1, label="Original")
        ax.set_title(grp)
        ax.set_xlabel("global budget B")
        ax.set_ylabel("score (points)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.subplots_adjust(wspace=0.35)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, -0.02), frameon=False)
    if title:
        fig.suptitle(title, y=1.02)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)

def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def _speedup_interval(r: pd.DataFrame):
    """(asymmetric xerr/yerr array, filled mask) of speedup rows: bars from `speedup_lo`..`speedup_hi` where the
    rows have them (none for tables written before the intervals), filled markers where `resolved` is not False."""
    if "speedup_lo" in r and r["speedup_lo"].notna().any():
        err = [(r["speedup"] - r["speedup_lo"]).clip(lower=0).fillna(0).to_numpy(),
               (r["speedup_hi"] - r["speedup"]).clip(lower=0).fillna(0).to_numpy()]
    else:
        err = None
    filled = (r["resolved"].astype(object) != False).to_numpy() if "resolved" in r else [True] * len(r)  # noqa: E712
    return err, filled


def _points(ax, x, y, filled, color, marker="o", ms=5):
    """Markers at (x, y): filled where `filled`, hollow (white face) where not: unresolved speedups."""
    for xi, yi, f in zip(x, y, filled):
        ax.plot([xi], [yi], marker=marker, ms=ms, ls="none", color=color, mfc=color if f else "white", mec=color)


def speedup_vs_budget(df: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Fig. 5: measured speedup vs the original against the global budget, prefill and decode panels, each point
    with its interval (`speedup_lo`..`speedup_hi`, from the interleaved runs) as an error bar and hollow when the
    speedup is unresolved, with the ideal (only the expert GEMMs shrink) as a dashed line. `df`:
    `latency.speedup_frame` rows (phase, method, budget, speedup, ideal_speedup, speedup_lo/hi, resolved)."""
    data = df[df["method"] != "original"].sort_values("budget")
    methods = sorted(set(data["method"]))
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    markers = dict(zip(methods, "osD^vP*X"))
    sns.set_theme(style="whitegrid", context="paper")
    phases = [p for p in ("prefill", "decode") if p in set(data["phase"])]
    fig, axes = plt.subplots(1, len(phases), figsize=(3.6 * len(phases), 3.0), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        d = data[data["phase"] == phase]
        for m in methods:
            r = d[d["method"] == m]
            err, filled = _speedup_interval(r)
            ax.errorbar(r["budget"], r["speedup"], yerr=err, color=palette[m], lw=1.2, capsize=2, label=m)
            _points(ax, r["budget"], r["speedup"], filled, palette[m], markers[m])
        ideal = d.groupby("budget")["ideal_speedup"].mean()
        ax.plot(ideal.index, ideal.values, "k--", marker="_", ms=14, lw=1, label="ideal (experts only)")
        ax.axhline(1.0, color="grey", lw=0.8)
        if "resolved" in d and (d["resolved"].astype(object) == False).any():  # noqa: E712
            ax.plot([], [], "o", color="grey", mfc="white", label="unresolved (hollow)")
        ax.legend(loc="upper right", fontsize=6)
        ax.set_title(f"phase = {phase}")
        ax.set_xlabel("global budget B (activations per token)")
        ax.set_ylabel("speedup vs original (95% interval)")
    if title:
        fig.suptitle(title, y=1.03)
    _save(fig, path)


def expert_load(loads: pd.DataFrame, path: str | Path, *, plan: str, layer: int, title: str = "") -> None:
    """Fig. 7: one layer's per-expert load (computed pairs), original vs `plan`."""
    data = loads[(loads["layer"] == layer) & loads["plan"].isin(["original", plan])]
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(8, 2.8))
    sns.barplot(data=data, x="expert", y="load", hue="plan", hue_order=["original", plan], ax=ax, dodge=True)
    ax.set_xlabel(f"expert (MoE layer at decoder index {layer})")
    ax.set_ylabel("token-expert pairs computed")
    ax.set_xticks(ax.get_xticks()[::8])
    ax.set_title(title or f"expert load, layer {layer}: original vs {plan}")
    _save(fig, path)


def load_balance_by_layer(metrics: pd.DataFrame, path: str | Path, *, plan: str, title: str = "") -> None:
    """Fig. 8: per-layer Spearman rank correlation of expert loads, normalised-entropy delta and JS divergence."""
    names = {"spearman": "Spearman (loads)", "entropy_delta": "normalised entropy delta", "js_divergence": "JS divergence (bits)"}
    data = metrics[(metrics["plan"] == plan) & metrics["metric"].isin(names)].replace({"metric": names})
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(data=data, x="layer", y="value", col="metric", hue="metric", kind="line", marker="o",
                    col_order=list(names.values()), height=2.6, aspect=1.1, facet_kws={"sharey": False}, legend=False)
    g.set_titles("{col_name}")
    g.set_axis_labels("decoder layer", "")
    g.figure.suptitle(title or f"load balance, original vs {plan}", y=1.04)
    _save(g.figure, path)


def plan_allocation(plan, path: str | Path, title: str = "") -> None:
    """Fig. 12a: a plan's K per MoE layer, with the uniform share B / L as a dashed line."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6, 2.6))
    sns.barplot(x=[str(i) for i in plan.moe_layers], y=plan.k_per_layer, color="C0", ax=ax)
    ax.axhline(plan.budget / plan.num_layers, color="k", ls="--", lw=1, label=f"uniform B/L = {plan.budget / plan.num_layers:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("K (experts per token)")
    ax.set_ylim(0, plan.k_orig)
    ax.legend(fontsize=7)
    ax.set_title(title or f"{plan.layer_method} x {plan.token_allocation}, B = {plan.budget:g}")
    _save(fig, path)


def experts_vs_entropy(tokens: pd.DataFrame, path: str | Path, *, plan: str, layer: int | None = None, title: str = "") -> None:
    """Fig. 12b: routing entropy of tokens by the number of experts they were given (median and interquartile range).
    `tokens`: the load-balance token table (plan, layer, experts, tokens, entropy quartiles); `layer` None = all."""
    data = tokens[tokens["plan"] == plan]
    data = data if layer is None else data[data["layer"] == layer]
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(4, 3))
    for i, (lay, d) in enumerate(data.groupby("layer")):
        d = d.sort_values("experts")
        x = d["experts"] + (i - data["layer"].nunique() / 2) * 0.04
        ax.errorbar(x, d["entropy_median"], yerr=[d["entropy_median"] - d["entropy_q25"], d["entropy_q75"] - d["entropy_median"]],
                    marker="o", ms=3, lw=1, capsize=2, label=f"layer {lay}")
    ax.set_xlabel("experts computed for the token")
    ax.set_ylabel("routing entropy (nats)")
    if data["layer"].nunique() <= 8:
        ax.legend(fontsize=6)
    ax.set_title(title or f"{plan}: experts per token vs routing entropy")
    _save(fig, path)


def accuracy_vs_speedup(df: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """The paper's Fig. 1: mean group score (± SE bars) against the measured speedup over the original model (its
    interval as horizontal bars, hollow markers where the speedup is unresolved), one panel per phase (prefill,
    decode), one line per method through its budgets (each point labelled with B), the original model as a star at
    speedup 1 with a dashed line at its score. `df`: `summary.tradeoff_table` rows."""
    phases = [p for p in ("prefill", "decode") if p in set(df["phase"])]
    methods = sorted(set(df["method"]) - {"Original"})
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        d = df[df["phase"] == phase]
        for m in methods:
            r = d[d["method"] == m].sort_values("budget")
            xerr, filled = _speedup_interval(r)
            ax.errorbar(r["speedup"], r["value"], xerr=xerr, yerr=r["stderr"], label=m, color=palette[m], ms=4,
                        capsize=2, lw=1.2)
            _points(ax, r["speedup"], r["value"], filled, palette[m], ms=4)
            for x, y, b in zip(r["speedup"], r["value"], r["budget"]):
                ax.annotate(f"B={b:g}", (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6,
                            color=palette[m])
        o = d[d["method"] == "Original"]
        if not o.empty:
            ax.errorbar(o["speedup"], o["value"], yerr=o["stderr"], color="black", marker="*", ms=10, capsize=2,
                        ls="none", label=f"Original (B={o['budget'].iloc[0]:g})")
            ax.axhline(o["value"].iloc[0], color="black", ls="--", lw=0.8)
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{phase} speedup")
        ax.set_xlabel(f"measured {phase} speedup vs original (x)")
        ax.set_ylabel("mean of group scores (points)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, -0.01), frameon=False)
    if title:
        fig.suptitle(title, y=1.02)
    _save(fig, path)
