"""The paper's claims as data, evaluated on a run: results/summary/claims.csv (and the claims part of fidelity.md).

`CLAIMS` lists each claim once: where the paper makes it, what it says, what it compares and the region the effect
must lie in for the claim to hold. `claims_table` evaluates every claim on a run's eval JSONs (per-item results,
`alloc-moe eval`'s "items"), latency.csv and load_balance.csv, one row per (claim, model, budget, group, comparison).

Effects and intervals (`alloc_moe.report.stats`):
- accuracy claims ("methods", "k_base", "calibration"): effect = A - B in points, for one task group (the mean of its
  tasks) or for "mean" (the mean of the groups, as Tables 2-4 average them), over the training seeds both methods
  have; 95% percentile bootstrap interval, paired: the same resampled items for A and B (within each task; across
  seeds also the seeds). `se_paired` and `se_unpaired` show what pairing buys. Without per-item results (eval JSONs
  written before they were kept) the effect comes from the task scores and there is no interval. Items that ask
  about the same thing are resampled as one cluster (`embedded.CLUSTERS`: emb_world's items by the world's fact they ask
  about, 48 of them, emb_world_forms' by its 96; labels from the suite's task files, `item_clusters`), with cluster-robust standard errors.
- load-balance claims ("layers"): a metric of load_balance.csv over the MoE layers of one plan: its mean, with a
  percentile bootstrap interval over the layers, or its extreme layer (min / max, no interval).
- latency claims ("latency"): a ratio of latency.csv's median speedups. Against the ideal, the interval is the
  speedup's own (`speedup_lo`, `speedup_hi`: the order-statistic interval of the per-run ratios original / plan for
  their median, coverage `speedup_level`: 96.1% with the embedded default's 9 runs, 96.9% with 6;
  `alloc_moe.stages.latency.median_interval`; the hf backend, and the vllm backend on eager engines, interleave the
  plans run by run; vllm with compiled or CUDA-graph engines times one engine after another) over the
  ideal; over several seeds the mean of the seeds' bounds, next to the mean effect. Between two methods there is no
  interval (the stage keeps each plan's interval, not every run's time, so the pairing across plans is lost): point.

Verdict rule (the same for every claim): a claim states a closed region [low, high] for its effect (">= 0" is
[0, inf), "within +-1 point" is [-1, 1], "> 0.7" is [0.7, inf)). With a 95% interval [ci_low, ci_high]:
- holds: the whole interval lies in the region (e.g. ">= 0": ci_low >= 0, A is better beyond the noise, or the two
  methods answer every item alike);
- does not hold: the interval lies wholly outside the region (">= 0": ci_high < 0, A is worse beyond the noise);
- unresolved: the interval straddles a boundary of the region: the run cannot tell.
Without an interval the point effect is compared instead and the verdict says so ("holds (point)"), for the claims
whose data has none (a speedup vs another method's, the extreme layer); an accuracy comparison without per-item results is
"unresolved (no per-item results)" (its effect is shown: the task scores' SEs of 0.6-0.8 points exceed most effects,
so a point verdict there would be a guess); a claim whose data the run lacks (no such method, budget or table) is one
row "unresolved (no data)". Tolerances are written into
the claims below from the paper's wording ("outperforms": 0; "best or near-best": 0.5 points; "insensitive": an
equivalence margin of 1 point; thresholds the paper states are the paper's numbers) and never from a run's results.
The paper's "outperforms" is read as "at least as good, beyond the noise" at every budget and group: where the
paper itself says "in 10 of 12 settings", the table shows which settings hold, rather than a count tuned to agree.

Columns of claims.csv: claim, paper, model, budget, group, comparison, effect, ci_low, ci_high, se_paired,
se_unpaired, n_items, seeds, region, test, verdict; `group` is a task group or "mean" (accuracy), the latency
phase (latency) or empty (layers, and a comparison with a side not evaluated); `n_items` counts one seed's items (the
layers and seeds for layer claims); sorted on (claim, model, budget, group, comparison); floats %.6f, empty where
not computed.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.tasks import GROUPS
from ..data.tasks.embedded import CLUSTERS
from ..errors import AllocMoeError
from . import stats
from .summary import METHOD_NAMES, eval_files, method_names

INF = math.inf


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str  # where the paper says it
    statement: str
    kind: str  # methods | k_base | calibration | layers | latency
    a: str = ""  # the method the claim is about (summary.METHOD_NAMES); layers / latency: the plans' method
    b: tuple = ()  # methods: what `a` is compared with; latency: the reference ("ideal" or a method)
    groups: tuple = (*GROUPS, "mean")  # accuracy: the task groups compared ("mean": the mean of the groups)
    low: float = 0.0  # the claimed region of the effect: [low, high]
    high: float = INF
    metric: str = ""  # layers: load_balance.csv metric; latency: the phase ("" = both)
    reduce: str = "mean"  # layers: mean (bootstrap over layers); min, max, absmax: the extreme layer (no interval)


CLAIMS = [
    Claim("fig3-alloc-moe-vs-baselines", "Fig. 3 (sec. 4.2)",
          "Alloc-MoE (Alloc-L + Alloc-T) scores at least as well as each baseline, at every budget and task group",
          "methods", "Alloc-MoE", ("Uniform", "LExI", "Dynamic-MoE", "NAEE")),
    Claim("fig4-alloc-l-vs-layer-baselines", "Fig. 4 (sec. 4.7)",
          "Alloc-L scores at least as well as every layer-wise allocation (top-k tokens)",
          "methods", "Alloc-L", ("Uniform", "Ascending", "Descending", "LExI")),
    Claim("fig6-alloc-t-vs-token-baselines", "Fig. 6 (sec. 4.7)",
          "Alloc-T scores at least as well as top-k, top-p (Dynamic-MoE) and NAEE, all under Uniform layers",
          "methods", "Alloc-T", ("Uniform", "Dynamic-MoE", "NAEE")),
    Claim("table4-l-improves-uniform", "Table 4 item 1 (sec. 4.7)",
          "+L (Alloc-L) improves on Uniform at every budget (mean of the groups)",
          "methods", "Alloc-L", ("Uniform",), groups=("mean",)),
    Claim("table4-t-improves-uniform", "Table 4 item 2 (sec. 4.7)",
          "+T (Alloc-T) improves on Uniform at every budget (mean of the groups)",
          "methods", "Alloc-T", ("Uniform",), groups=("mean",)),
    Claim("table4-lt-near-best", "Table 4 item 3 (sec. 4.7)",
          "+L+T is the best or near-best: at most 0.5 points below +L and below +T (mean of the groups)",
          "methods", "Alloc-MoE", ("Alloc-L", "Alloc-T"), groups=("mean",), low=-0.5),
    Claim("table2-k-base-1-near-best", "Table 2 (sec. 4.3)",
          "K_base = 1 is the best or near-best base allocation of Alloc-T under Uniform: at most 0.5 points below any "
          "other K_base (mean of the groups)", "k_base", "Alloc-T", groups=("mean",), low=-0.5),
    Claim("table3-calibration-insensitive", "Table 3 (sec. 4.6)",
          "Alloc-L is insensitive to the calibration set: another set scores within 1 point of the default "
          "(mean of the groups)", "calibration", "Alloc-L", groups=("mean",), low=-1.0, high=1.0),
    Claim("fig12-experts-follow-entropy", "Fig. 12b (sec. 4.5)",
          "Alloc-T's experts per token correlate with routing entropy: Spearman > 0.7 (mean over MoE layers)",
          "layers", "Alloc-MoE", metric="experts_entropy_spearman", low=0.7, high=1.0),
    Claim("fig8-load-order-preserved", "Figs. 7 and 8 (sec. 4.4)",
          "Alloc-MoE preserves the order of hot and cold experts: Spearman of expert loads vs the original >= 0.93 in "
          "every MoE layer", "layers", "Alloc-MoE", metric="spearman", low=0.93, high=1.0, reduce="min"),
    Claim("fig8-entropy-kept", "Fig. 8 (sec. 4.4)",
          "Alloc-MoE changes the normalised load entropy by at most 0.035 in every MoE layer",
          "layers", "Alloc-MoE", metric="entropy_delta", low=-0.035, high=0.035, reduce="absmax"),
    Claim("fig8-js-small", "Fig. 8 (sec. 4.4)",
          "Alloc-MoE's weighted load distribution stays within JS divergence 0.014 of the original in every MoE layer",
          "layers", "Alloc-MoE", metric="js_divergence_weighted", low=0.0, high=0.014, reduce="max"),
    Claim("fig5-speedup-as-lexi", "Fig. 5 (sec. 4.2)",
          "Alloc-MoE adds no runtime overhead: its speedup is at least 0.9x LExI's at the same budget (ratio - 1)",
          "latency", "Alloc-MoE", ("LExI",), low=-0.1),
    Claim("fig5-speedup-near-ideal", "Fig. 5 (sec. 4.2; the harness reading)",
          "Alloc-MoE's speedup reaches at least 0.8x the ideal speedup of its budget (only the expert GEMMs shrink; "
          "ratio - 1)", "latency", "Alloc-MoE", ("ideal",), low=-0.2),
]

VERDICTS = ["holds", "does not hold", "unresolved", "holds (point)", "does not hold (point)"]  # fidelity.md's counts
COLUMNS = ["claim", "paper", "model", "budget", "group", "comparison", "effect", "ci_low", "ci_high", "se_paired",
           "se_unpaired", "n_items", "seeds", "region", "test", "verdict"]


def verdict(low: float, high: float, effect: float, ci: tuple[float, float] | None) -> str:
    """The module docstring's rule: region [low, high], the effect's interval `ci` (None: the point only)."""
    if effect is None or not math.isfinite(effect):
        return "unresolved (no data)"
    lo, hi = ci if ci is not None else (effect, effect)
    v = "holds" if low <= lo and hi <= high else "does not hold" if hi < low or lo > high else "unresolved"
    return v if ci is not None else f"{v} (point)"


def region(c: Claim) -> str:
    if c.high == INF:
        return f">= {c.low:g}"
    return f"in [{c.low:g}, {c.high:g}]"


# ---- eval JSONs --------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One eval JSON: a method at one budget and seed."""
    model: str
    method: str
    k_base: str
    calibration: str
    budget: float
    seed: int
    groups: dict  # task -> group
    values: dict  # task -> score (points)
    items: dict | None  # task -> {leaf task: [per-item value]} (None: not kept)


def load_entries(paths) -> list[Entry]:
    """The eval JSONs behind `paths` (files or folders, `eval_files`) as Entries; a list of Entries is returned as it is,
    so a caller that needs them twice (`claims_table`, `seed_resolution`) reads the files once."""
    if paths and all(isinstance(p, Entry) for p in paths):
        return list(paths)
    out = []
    for p in eval_files(paths):
        try:
            d = json.loads(Path(p).read_text())
            rows = d["rows"]
            head = rows[0]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            raise AllocMoeError(f"{p} is not an `alloc-moe eval` result (no rows)") from None
        method = METHOD_NAMES.get((head["layer_method"], head["token_allocation"]),
                                  f"{head['layer_method']}+{head['token_allocation']}")
        out.append(Entry(head["model"], method, str(head["k_base"]), head["calibration"] or "", float(head["budget"]),
                         int(head["seed"]), {r["task"]: r["group"] for r in rows},
                         {r["task"]: float(r["value"]) for r in rows}, d.get("items")))
    return out


def item_clusters(folders) -> dict[str, list[str]]:
    """{task: cluster label of each item, in document order} for the `CLUSTERS` tasks found as <task>.jsonl in the
    task folders `folders` (an embedded suite's, results/tasks/<suite>); a task in several folders must agree."""
    out: dict[str, list[str]] = {}
    for folder in folders:
        for task, key in CLUSTERS.items():
            f = Path(folder) / f"{task}.jsonl"
            if not f.is_file():
                continue
            try:
                labels = [key(json.loads(line)) for line in f.read_text(encoding="utf-8").splitlines() if line]
            except (ValueError, KeyError, StopIteration, TypeError):
                raise AllocMoeError(f"{f}: not {task}'s items (cannot tell the fact an item asks about)") from None
            if out.setdefault(task, labels) != labels:
                raise AllocMoeError(f"{f}: other {task} items than in another task folder given")
    return out


def _strata(a: Entry, b: Entry, group: str, clusters: dict | None = None) -> tuple[list | None, float, int, set] | None:
    """(strata of A - B in points with weights summing to 1, the effect from the task scores, items, the leaf tasks
    resampled by cluster) for one group
    ("mean": the mean of the groups) of one seed; None if the two share no task there. Strata are None without
    per-item results for every task. A leaf task in `clusters` (task -> label per item in document order) gets its
    items' cluster labels (the first n: the eval's `limit` takes the first documents)."""
    tasks = sorted(t for t in a.values if t in b.values and a.groups[t] == b.groups.get(t))
    groups = sorted({a.groups[t] for t in tasks}) if group == "mean" else [group]
    by_group = {g: [t for t in tasks if a.groups[t] == g] for g in groups}
    by_group = {g: ts for g, ts in by_group.items() if ts}
    if not by_group:
        return None
    weights = {t: 1.0 / len(by_group) / len(ts) for ts in by_group.values() for t in ts}
    point = sum(w * (a.values[t] - b.values[t]) for t, w in weights.items())
    strata, n, clustered = [], 0, set()
    for t, w in weights.items():
        ia, ib = (a.items or {}).get(t), (b.items or {}).get(t)
        if not ia or not ib or sorted(ia) != sorted(ib) or any(len(ia[k]) != len(ib[k]) for k in ia):
            return None, point, 0, set()
        for leaf in sorted(ia):
            labels = (clusters or {}).get(leaf)
            if labels is not None and len(labels) < len(ia[leaf]):
                raise AllocMoeError(f"{leaf}: {len(ia[leaf])} per-item results but only {len(labels)} items in its "
                                    f"task file: results of another suite?")
            strata.append(stats.stratum(100.0 * np.asarray(ia[leaf]), 100.0 * np.asarray(ib[leaf]), w / len(ia),
                                        None if labels is None else labels[:len(ia[leaf])]))
            n += len(ia[leaf])
            clustered |= {leaf} if labels is not None else set()
    return strata, point, n, clustered


def compare(a_by_seed: dict, b_by_seed: dict, group: str, clusters: dict | None = None) -> dict:
    """Effect, interval and standard errors of A - B (seed -> Entry each) for one group, over their common seeds."""
    per_seed = {s: _strata(a_by_seed[s], b_by_seed[s], group, clusters)
                for s in sorted(set(a_by_seed) & set(b_by_seed))}
    per_seed = {s: v for s, v in per_seed.items() if v is not None}
    if not per_seed:
        return {"effect": math.nan, "seeds": 0, "test": "no common tasks"}
    k = len(per_seed)
    out = {"seeds": k, "n_items": max(n for _, _, n, _ in per_seed.values())}
    if any(st is None for st, _, _, _ in per_seed.values()):
        return out | {"effect": sum(p for _, p, _, _ in per_seed.values()) / k, "test": "point: no per-item results",
                      "verdict": "unresolved (no per-item results)"}
    scaled = [[s._replace(weight=s.weight / k) for s in st] for st, _, _, _ in per_seed.values()]
    flat = [s for st in scaled for s in st]
    clustered = sorted(set().union(*(c for _, _, _, c in per_seed.values())))
    return out | {"effect": stats.effect(flat), "ci": stats.bootstrap_interval(scaled),
                  "se_paired": stats.paired_se(flat), "se_unpaired": stats.unpaired_se(flat),
                  "test": "paired bootstrap over items" + (" and seeds" if k > 1 else "")
                  + (f" ({', '.join(clustered)}: over the facts asked)" if clustered else "")}


# ---- the pairs each claim compares ------------------------------------------------------------------------------
def _by_seed(entries: list[Entry]) -> dict:
    return {e.seed: e for e in sorted(entries, key=lambda e: (e.seed, e.calibration, e.k_base))}


def _pairs(c: Claim, entries: list[Entry], k_base: int, calibration: str):
    """(model, budget, comparison, A by seed, B by seed) for an accuracy claim."""
    def default(e: Entry) -> bool:  # k_base is "" for every token allocation but alloc-t
        return e.k_base in ("", str(k_base)) and e.calibration in ("", "none", calibration)

    for model in sorted({e.model for e in entries}):
        mine = [e for e in entries if e.model == model]
        for budget in sorted({e.budget for e in mine if e.method == c.a}):
            at = [e for e in mine if e.budget == budget]
            if c.kind == "methods":
                a = _by_seed([e for e in at if e.method == c.a and default(e)])
                for other in c.b:
                    yield model, budget, f"{c.a} vs {other}", a, _by_seed([e for e in at if e.method == other and default(e)])
            elif c.kind == "k_base":
                ts = [e for e in at if e.method == c.a]
                a = _by_seed([e for e in ts if e.k_base == str(k_base)])
                for kb in sorted({e.k_base for e in ts} - {str(k_base)}, key=int):
                    yield model, budget, f"K_base={k_base} vs K_base={kb}", a, _by_seed([e for e in ts if e.k_base == kb])
            elif c.kind == "calibration":
                ls = [e for e in at if e.method == c.a]
                b = _by_seed([e for e in ls if e.calibration == calibration])
                for cal in sorted({e.calibration for e in ls} - {calibration}):
                    yield model, budget, f"{cal} vs {calibration}", _by_seed([e for e in ls if e.calibration == cal]), b


def accuracy_rows(c: Claim, entries: list[Entry], k_base: int, calibration: str,
                  clusters: dict | None = None) -> list[dict]:
    rows = []
    for model, budget, comparison, a, b in _pairs(c, entries, k_base, calibration):
        key = {"model": model, "budget": budget, "comparison": comparison}
        if not a or not b:  # one side not evaluated (at the default K_base and calibration set): one row
            missing = comparison.split(" vs ")[0 if not a else 1]
            rows.append(key | {"group": "", "effect": math.nan, "seeds": 0, "test": f"{missing} not evaluated"})
            continue
        present = {g for e in (*a.values(), *b.values()) for g in e.groups.values()}  # the suite's groups
        rows += [key | {"group": group, **compare(a, b, group, clusters)} for group in c.groups
                 if group == "mean" or group in present]  # a group the suite lacks (embedded v2: NLU) has no row
    return rows


def _plan_is_default(plan: str, k_base: int, calibration: str) -> bool:
    """A workflow plan name layer__token__kb{K}__{calibration}__B{budget} at the default K_base and calibration
    (the load-balance and latency tables name plans, not their K_base and calibration set)."""
    parts = plan.split("__")
    if len(parts) != 5:
        return True
    return parts[2] == f"kb{k_base}" and parts[3] in ("none", calibration)


def layer_rows(c: Claim, lb: pd.DataFrame | None, k_base: int, calibration: str) -> list[dict]:
    """A load_balance.csv metric over the MoE layers of each plan of `c.a` (per model, budget; over seeds)."""
    if lb is None or lb.empty:
        return []
    d = lb.assign(method=method_names(lb))
    d = d[(d.method == c.a) & (d.metric == c.metric) & d.plan.map(lambda p: _plan_is_default(p, k_base, calibration))]
    rows = []
    for (model, budget), g in d.groupby(["model", "budget"], sort=True):
        v = g.value.astype(float).to_numpy()
        v = v[np.isfinite(v)]
        row = {"model": model, "budget": float(budget), "group": "", "comparison": f"{c.a}: {c.metric} ({c.reduce})",
               "seeds": g.seed.nunique() if "seed" in g else 1, "n_items": len(v)}
        if not len(v):
            rows.append(row | {"effect": math.nan, "test": "no finite value"})
        elif c.reduce == "mean":
            s = [stats.stratum(v, np.zeros_like(v))]
            ci = stats.bootstrap_interval([s]) if len(v) > 1 else None
            rows.append(row | {"effect": float(v.mean()), "ci": ci, "test": "bootstrap over layers (and seeds)"})
        else:
            extreme = {"min": v.min(), "max": v.max(), "absmax": v[np.argmax(np.abs(v))]}[c.reduce]
            rows.append(row | {"effect": float(extreme), "test": f"point: the {c.reduce} over layers (and seeds)"})
    return rows


def latency_rows(c: Claim, lat: pd.DataFrame | None, k_base: int, calibration: str) -> list[dict]:
    """speedup(A) / reference - 1 per model, budget and phase, the reference being the ideal speedup or another
    method's speedup at the same budget and seed; the mean over seeds."""
    if lat is None or lat.empty:
        return []
    d = lat.assign(method=method_names(lat))
    d = d[d.plan.map(lambda p: _plan_is_default(p, k_base, calibration))]
    keys = ["model", "budget", "phase", "seed"]
    a = d[d.method == c.a].set_index(keys)
    rows = []
    for ref in c.b:
        if ref == "ideal":
            ratio = a.speedup / a.ideal_speedup
        else:
            b = d[d.method == ref].set_index(keys)
            ratio = (a.speedup / b.speedup.reindex(a.index))
        ratio = ratio.dropna().reset_index(name="r")
        if ref == "ideal" and {"speedup_lo", "speedup_hi"} <= set(a.columns):  # the runs' interval, over the ideal
            bounds = pd.DataFrame({"lo": a.speedup_lo / a.ideal_speedup, "hi": a.speedup_hi / a.ideal_speedup,
                                   "level": a.get("speedup_level")}).reset_index()
            ratio = ratio.merge(bounds, on=keys, how="left")
        for (model, budget, phase), g in ratio.groupby(["model", "budget", "phase"], sort=True):
            row = {"model": model, "budget": float(budget), "group": phase, "comparison": f"{c.a} vs {ref}",
                   "effect": float(g.r.mean() - 1.0), "seeds": g.seed.nunique(),
                   "test": "point: median speedups (no per-run times)"}
            if "lo" in g and g.lo.notna().all() and g.hi.notna().all():
                level = g.level.min() if "level" in g and g.level.notna().all() else math.nan
                seeds = "" if len(g) == 1 else f", the mean of {len(g)} seeds' bounds"
                row |= {"ci": (float(g.lo.mean() - 1.0), float(g.hi.mean() - 1.0)),
                        "test": f"per-run ratios: median interval ({level:.1%}){seeds}"}
            rows.append(row)
    return rows


def claims_table(evals, *, k_base: int, calibration: str, latency: pd.DataFrame | None = None,
                 load_balance: pd.DataFrame | None = None, clusters: dict | None = None) -> pd.DataFrame:
    """Every claim of `CLAIMS` on the eval JSONs `evals` (files or directories, or their `load_entries`) and the latency / load-balance
    tables (None: not measured), with `clusters` (`item_clusters`; None: every item independent): the COLUMNS of
    claims.csv, byte-stable order."""
    entries = load_entries(evals)
    out = []
    for c in CLAIMS:
        if c.kind == "layers":
            rows = layer_rows(c, load_balance, k_base, calibration)
        elif c.kind == "latency":
            rows = latency_rows(c, latency, k_base, calibration)
        else:
            rows = accuracy_rows(c, entries, k_base, calibration, clusters)
        if not rows:
            rows = [{"model": "", "budget": math.nan, "group": "", "comparison": "", "effect": math.nan, "seeds": 0,
                     "test": "no data"}]
        for r in rows:
            ci = r.get("ci")
            out.append({"claim": c.id, "paper": c.paper, **{k: r.get(k) for k in ("model", "budget", "group",
                                                                                   "comparison", "effect")},
                        "ci_low": ci[0] if ci else math.nan, "ci_high": ci[1] if ci else math.nan,
                        "se_paired": r.get("se_paired", math.nan), "se_unpaired": r.get("se_unpaired", math.nan),
                        "n_items": r.get("n_items", 0), "seeds": r["seeds"], "region": region(c), "test": r["test"],
                        "verdict": r.get("verdict") or verdict(c.low, c.high, r["effect"], ci)})
    df = pd.DataFrame(out, columns=COLUMNS)
    order = {c.id: i for i, c in enumerate(CLAIMS)}
    df = df.assign(_o=df.claim.map(order)).sort_values(["_o", "model", "budget", "group", "comparison"], kind="stable")
    return df.drop(columns="_o").reset_index(drop=True)


def claims_summary(df: pd.DataFrame) -> str:
    """fidelity.md's head: per claim its statement, claimed region and how many rows hold, do not, are unresolved."""
    lines = ["## The paper's claims on this run", "",
             "From results/summary/claims.csv (`alloc_moe.report.claims`; the rule: docs/results/fidelity.md): accuracy "
             "effects are A - B in points with a 95% paired bootstrap interval; holds = the interval lies in the claimed "
             "region, does not hold = wholly outside it, unresolved = it straddles a boundary; (point) = no interval, "
             "the point effect decided. Every row is listed at the end.", "",
             "| claim | paper | statement | claimed | " + " | ".join(VERDICTS) + " |", "|---" * (4 + len(VERDICTS)) + "|"]
    for c in CLAIMS:
        v = df[df.claim == c.id].verdict.map(lambda x: "unresolved" if x.startswith("unresolved") else x)
        lines.append(f"| {c.id} | {c.paper} | {c.statement} | {region(c)} | "
                     + " | ".join(str(int((v == k).sum())) for k in VERDICTS) + " |")
    return "\n".join(lines) + "\n"


def resolution(df: pd.DataFrame, difference: float = 1.0) -> pd.DataFrame:
    """How finely each task group resolves (the suite's rule R2, docs/results/task-suite-v2.md): over the rows of the
    per-group method claims (Figs. 3, 4, 6) with a paired SE, per group the rows, their median paired SE and how many
    resolve `difference` points (1.96 x SE <= difference). Columns: group, rows, median_se, resolved."""
    per_group = {c.id for c in CLAIMS if c.kind == "methods" and c.groups == Claim.groups}
    se = pd.to_numeric(df.se_paired, errors="coerce")  # empty cells (a CSV read with keep_default_na=False) -> NaN
    d = df.assign(se_paired=se)[df.claim.isin(per_group) & np.isfinite(se)]
    out = [{"group": g, "rows": len(x), "median_se": float(x.se_paired.median()),
            "resolved": int((1.96 * x.se_paired <= difference).sum())}
           for g in Claim.groups if len(x := d[d.group == g])]
    return pd.DataFrame(out, columns=["group", "rows", "median_se", "resolved"])


def seed_resolution(evals, *, k_base: int, calibration: str, clusters: dict | None = None,
                    difference: float = 1.0) -> pd.DataFrame:
    """`resolution` on each training seed alone: the same rows (Figs. 3, 4 and 6, per group) with one seed's paired SE.
    Over k seeds a row's SE is sqrt(sum of the seeds' squared SEs) / k, so this shows which seed holds a group back.
    Analytic SEs only (no bootstrap). Columns: seed, group, rows, median_se, resolved."""
    entries = load_entries(evals)
    rows = []
    for c in CLAIMS:
        if c.kind != "methods" or c.groups != Claim.groups:
            continue
        for *_, a, b in _pairs(c, entries, k_base, calibration):
            for s in sorted(set(a) & set(b)):
                for group in c.groups:
                    st = _strata(a[s], b[s], group, clusters)
                    if st is not None and st[0] is not None:
                        rows.append({"seed": s, "claim": c.id, "group": group, "se_paired": stats.paired_se(st[0])})
    df = pd.DataFrame(rows, columns=["seed", "claim", "group", "se_paired"])
    out = [resolution(x, difference).assign(seed=s) for s, x in df.groupby("seed")]
    cols = ["seed", "group", "rows", "median_se", "resolved"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def resolution_summary(df: pd.DataFrame, difference: float = 1.0, per_seed: pd.DataFrame | None = None) -> str:
    """fidelity.md's section on `resolution`: a group passes R2 when every one of its rows resolves `difference`;
    with `per_seed` (`seed_resolution`) of several seeds, a table of each seed's median SE and resolved rows."""
    lines = ["## Resolution per task group", "",
             f"The suite's rule R2: every group's paired standard error resolves a {difference:g}-point difference "
             f"(1.96 x SE <= {difference:g}), here over the rows of Figs. 3, 4 and 6 (every method pair, budget and "
             "group; over the seeds where there are several). The suite is held to it over the fidelity study's seeds "
             "(config/fidelity.yaml); one seed's SEs are larger.", "",
             "| group | rows | median paired SE | rows resolving 1.96 x SE <= %g | R2 |" % difference, "|---|---:|---:|---:|---|"]
    for r in resolution(df, difference).itertuples():
        lines.append(f"| {r.group} | {r.rows} | {r.median_se:.3f} | {r.resolved} | "
                     f"{'met' if r.resolved == r.rows else 'not met'} |")
    if per_seed is not None and per_seed.seed.nunique() > 1:
        groups = [g for g in Claim.groups if g in set(per_seed.group)]
        lines += ["", "Each seed alone, median paired SE (rows resolving 1.96 x SE <= %g). Over k seeds a row's SE is "
                  "sqrt(sum of the seeds' squared SEs) / k, so a seed with large SEs holds its group back:" % difference,
                  "", "| seed | " + " | ".join(groups) + " |", "|---:" + "|---:" * len(groups) + "|"]
        for seed, x in per_seed.groupby("seed"):
            cell = {r.group: f"{r.median_se:.3f} ({r.resolved} of {r.rows})" for r in x.itertuples()}
            lines.append(f"| {seed} | " + " | ".join(cell.get(g, "") for g in groups) + " |")
    return "\n".join(lines) + "\n"


def claims_details(df: pd.DataFrame) -> str:
    """fidelity.md's tail: every row of the claims table, one section per claim."""
    lines = ["## The claims, row by row", ""]
    for c in CLAIMS:
        lines += [f"### {c.id}: {c.paper}", "", "| model | B | group | comparison | effect [95% CI] | test | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in df[df.claim == c.id].itertuples():
            ci = f" [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" if math.isfinite(r.ci_low) else ""
            eff = f"{r.effect:+.3f}{ci}" if math.isfinite(r.effect) else "n/a"
            b = f"{r.budget:g}" if math.isfinite(r.budget) else ""
            lines.append(f"| {r.model} | {b} | {r.group} | {r.comparison} | {eff} | {r.test} | {r.verdict} |")
        lines.append("")
    return "\n".join(lines)
