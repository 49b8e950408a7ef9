"""Seaborn figures of the result tables."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .io import atomic_path  # noqa: E402


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
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.08), frameon=False)
    if title:
        fig.suptitle(title, y=1.02)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
