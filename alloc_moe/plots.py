"""Seaborn figures of the result tables."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .io import atomic_path  # noqa: E402


def perplexity_vs_budget(df: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Perplexity change vs the original model, against the global budget, one panel per text family."""
    data = df[df["method"] != "original"]
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
