"""The fidelity study's share of Uniform's loss recovered (docs/results/fidelity.md), against hand-computed values."""

import pandas as pd
import pytest

from alloc_moe.report.summary import fidelity_report, recovered_shares, uniform_loss


def _groups(rows):
    """A group_table-like frame from (method, budget, seed, group, value, stderr)."""
    return pd.DataFrame(rows, columns=["method", "budget", "seed", "group", "value", "stderr"]).assign(model="m")


# seed 0: Uniform loses 4 Reasoning points (SE 1) and 0.5 Math points (below the SE 1: no ratio);
# seed 1: Uniform loses 2 Reasoning points and 3 Math points.
SCORES = {  # method -> seed -> (Reasoning, Math)
    "Original": {0: (80.0, 40.0), 1: (70.0, 30.0)},
    "Uniform": {0: (76.0, 39.5), 1: (68.0, 27.0)},
    "Alloc-L": {0: (77.0, 39.0), 1: (69.0, 28.0)},
    "Alloc-T": {0: (79.0, 40.0), 1: (67.0, 30.0)},
    "Alloc-MoE": {0: (80.0, 39.9), 1: (70.0, 29.0)},
}


@pytest.fixture
def g():
    rows = []
    for method, per_seed in SCORES.items():
        for seed, (r, m) in per_seed.items():
            b = 32 if method == "Original" else 16
            rows += [(method, b, seed, "Reasoning", r, 1.0), (method, b, seed, "Math", m, 1.0)]
    return _groups(rows)


def test_uniform_loss_and_shares_by_hand(g):
    losses = uniform_loss(g, "Reasoning", [0, 1], 32, 16)
    assert losses == {0: (4.0, 1.0, 76.0), 1: (2.0, 1.0, 68.0)}
    assert recovered_shares(g, "Alloc-L", "Reasoning", losses, 16) == [0.25, 0.5]
    assert recovered_shares(g, "Alloc-T", "Reasoning", losses, 16) == [0.75, -0.5]
    # Math: seed 0's loss (0.5) is below the SE (1.0), so only seed 1 counts
    math_losses = uniform_loss(g, "Math", [0, 1], 32, 16)
    assert recovered_shares(g, "Alloc-MoE", "Math", math_losses, 16) == [pytest.approx(2 / 3)]
    # mean of groups (SE sqrt(1 + 1) / 2 = 0.707): seed 0 loses 2.25, seed 1 2.5
    mean_losses = uniform_loss(g, None, [0, 1], 32, 16)
    assert mean_losses[0][0] == pytest.approx(2.25) and mean_losses[1][0] == pytest.approx(2.5)
    assert recovered_shares(g, "Alloc-L", None, mean_losses, 16) == [pytest.approx(0.25 / 2.25),
                                                                     pytest.approx(1.0 / 2.5)]


def test_a_loss_below_the_noise_gives_no_ratio(g):
    """A seed where Uniform loses (almost) nothing used to divide by ~0 (ratios of 1e5 in the report)."""
    g = g.copy()
    g.loc[(g.method == "Uniform") & (g.group == "Math"), "value"] = [40.0 - 1e-6, 30.0 - 1e-6]
    losses = uniform_loss(g, "Math", [0, 1], 32, 16)
    assert recovered_shares(g, "Alloc-T", "Math", losses, 16) == []


def test_report_has_the_loss_row_and_seed_counts():
    acc = pd.DataFrame([
        {"model": "m", "layer_method": lm, "token_allocation": tok, "k_base": "1", "budget": b, "calibration": cal,
         "task": "t", "group": "Reasoning", "value": v, "stderr": 1.0, "seed": s}
        for s, (o, u, x) in {0: (80.0, 76.0, 77.0), 1: (70.0, 68.0, 69.0)}.items()
        for lm, tok, b, cal, v in [("original", "topk", 32, "none", o), ("uniform", "topk", 16, "none", u),
                                   ("alloc-l", "topk", 16, "balanced", x)]])
    ppl = pd.DataFrame(columns=["model", "method", "token_allocation", "k_base", "calibration", "budget", "family",
                                "ppl_change_pct"])
    report = fidelity_report(acc, ppl, k_base=1, calibration="balanced")
    assert "| Uniform's loss (points) | 3.00 [2.00..4.00] | 3.00 [2.00..4.00] |" in report
    assert "| +L | 0.38 [0.25..0.50] (2) | 0.38 [0.25..0.50] (2) |" in report
    assert "| +T | n/a | n/a |" in report
