"""Regression tracking: compare the summary tables of two runs row by row, with per-metric tolerances.

`alloc-moe regress --baseline DIR --current DIR [--tolerance FILE] [--out report.csv]`: DIR is a workflow's results
directory (`results`, whose tables and manifest live in `summary/`) or the summary directory itself. Every table of
`TABLES` found in the baseline is compared with the current run's on its key columns (the summary tables' own).
Exit codes: 0 nothing regressed, 1 a regression (a metric moved the worse way beyond its tolerance, or a baseline
row is missing), 2 unusable input (a missing table, manifest or column, a duplicate key, a non-numeric value,
differing config hashes without `--allow-config-change`, a bad tolerance file).

Adding a summary table is one `TABLES` entry; adding a way to compare is one `COMPARISONS` entry.
"""

import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import pandas as pd

from ..errors import AllocMoeError
from ..io import atomic_path
from .manifest import MANIFEST, changed_files, read_manifest

DIRECTIONS = ("higher", "lower", "either")  # which way is better; 'either': a move beyond tolerance either way regresses
UNITS = ("auto", "fraction", "percent")  # points rules: accuracy given as 0-1 or 0-100 ('auto': 0-1 if every value is)
STATUSES = ("regressed", "missing", "improved", "new", "ok")  # display order; the first two fail the comparison


@dataclass(frozen=True)
class Rule:
    """How one metric is compared: `kind` names a COMPARISONS entry; the tolerance is in that comparison's unit."""

    kind: str
    tolerance: float
    direction: str = "higher"
    stderr_factor: float = 0.0  # points: the threshold is max(tolerance, stderr_factor x combined stderr)
    unit: str = "auto"


@dataclass(frozen=True)
class TableSpec:
    keys: tuple[str, ...]
    metrics: dict[str, Rule]  # value column -> rule
    stderr: str | None = None  # column with the value's standard error (same unit as the value)
    metric_key: str | None = None  # key column naming a row's metric; `by_metric` rules override per name
    by_metric: dict[str, dict] = field(default_factory=dict)


def _points(base, cur, base_se, cur_se, rule, scale):
    """Accuracy points: change cur - base in points; threshold max(tolerance, k x sqrt(se_b^2 + se_c^2))."""
    se = math.hypot(*(s * scale for s in (base_se, cur_se) if not math.isnan(s)))
    return (cur - base) * scale, max(rule.tolerance, rule.stderr_factor * se), "pt"


def _relative(base, cur, base_se, cur_se, rule, scale):
    """Relative change (cur - base) / |base|; tolerance as a fraction (0.10 = 10%)."""
    if cur == base:
        return 0.0, rule.tolerance, "rel"
    return (cur - base) / abs(base) if base else math.copysign(math.inf, cur - base), rule.tolerance, "rel"


def _absolute(base, cur, base_se, cur_se, rule, scale):
    """Absolute change cur - base, in the value's own unit."""
    return cur - base, rule.tolerance, "abs"


COMPARISONS = {"points": _points, "relative": _relative, "absolute": _absolute}

_RELATIVE_LOWER = {"kind": "relative", "tolerance": 0.01, "direction": "lower"}
TABLES = {
    "accuracy.csv": TableSpec(
        keys=("model", "layer_method", "token_allocation", "k_base", "budget", "calibration", "backend", "task",
              "group", "metric", "seed"),
        metrics={"value": Rule("points", 1.0, "higher", stderr_factor=2.0)},
        stderr="stderr", metric_key="metric",
        # lm-eval also reports perplexity-like metrics: lower is better, compared relatively
        by_metric={"word_perplexity": _RELATIVE_LOWER, "byte_perplexity": _RELATIVE_LOWER,
                   "bits_per_byte": _RELATIVE_LOWER, "perplexity": _RELATIVE_LOWER},
    ),
    "perplexity.csv": TableSpec(
        keys=("model", "layer_method", "token_allocation", "k_base", "budget", "calibration", "seed", "family"),
        metrics={"ppl": Rule("relative", 0.01, "lower")},
    ),
    "latency.csv": TableSpec(
        keys=("model", "seed", "plan", "layer_method", "token_allocation", "budget", "phase"),
        metrics={"median_ms": Rule("relative", 0.10, "lower")},
    ),
    "load_balance.csv": TableSpec(
        keys=("model", "seed", "plan", "layer", "metric"),
        metrics={"value": Rule("absolute", 0.05, "either")},
        metric_key="metric",
    ),
}

REPORT_COLUMNS = ["table", "key", "column", "baseline", "current", "change", "threshold", "unit", "status"]


# ---- input ----------------------------------------------------------------------------------------------------

def summary_dir(path: str | Path) -> Path:
    """A results directory's `summary/`, or the directory itself when it holds the tables directly."""
    path = Path(path)
    if not path.is_dir():
        raise AllocMoeError(f"{path} is not a directory; give a results directory (results) or its summary/")
    return path / "summary" if (path / "summary").is_dir() else path


def _canonical_key(cell: str) -> str:
    """'32', '32.0' and '32.000000' are the same budget: numbers are compared as numbers, the rest as text."""
    try:
        x = float(cell)
    except ValueError:
        return cell
    if not math.isfinite(x):
        return cell
    return str(int(x)) if x.is_integer() else repr(x)


def _numeric(df: pd.DataFrame, column: str, path: Path, lenient: bool) -> pd.Series:
    """Numbers; empty cells are NaN. A stderr column (`lenient`) also maps 'N/A'-like text to NaN."""
    values = pd.to_numeric(df[column].where(df[column].str.strip() != ""), errors="coerce")
    bad = values.isna() & df[column].str.strip().ne("") & ~df[column].str.strip().str.lower().isin(["nan"])
    if bad.any() and not lenient:
        row = int(bad.idxmax())
        raise AllocMoeError(f"{path}: column '{column}' has a non-numeric value {df[column][row]!r} in data row "
                            f"{row + 1}; allowed: numbers or an empty cell")
    return values


def read_table(path: Path, spec: TableSpec) -> pd.DataFrame:
    """The table indexed by its canonical key tuple, with numeric metric (and stderr) columns."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise AllocMoeError(f"{path} is not a readable CSV ({e})") from None
    needed = [*spec.keys, *spec.metrics, *([spec.stderr] if spec.stderr else [])]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise AllocMoeError(f"{path} lacks column(s) {', '.join(missing)}; {path.name} needs {', '.join(needed)}")
    out = pd.DataFrame({k: df[k].map(_canonical_key) for k in spec.keys})
    for col in spec.metrics:
        out[col] = _numeric(df, col, path, lenient=False)
    if spec.stderr:
        out[spec.stderr] = _numeric(df, spec.stderr, path, lenient=True)
    dup = out.duplicated(list(spec.keys), keep=False)
    if dup.any():
        first = out[dup].iloc[0]
        raise AllocMoeError(f"{path}: duplicate key {_key_text(spec.keys, tuple(first[k] for k in spec.keys))} "
                            f"({int(dup.sum())} rows share keys); each ({', '.join(spec.keys)}) must appear once")
    return out.set_index(list(spec.keys)).sort_index()


# ---- tolerance file -----------------------------------------------------------------------------------------

def _rule_overrides(where: str, raw) -> dict:
    allowed = [f.name for f in fields(Rule)]
    if not isinstance(raw, dict):
        raise AllocMoeError(f"tolerance file: {where} must be a mapping of {', '.join(allowed)}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise AllocMoeError(f"tolerance file: unknown field(s) {', '.join(unknown)} in {where}; allowed: {', '.join(allowed)}")
    return dict(raw)


def _check_rule(where: str, rule: Rule) -> Rule:
    if rule.kind not in COMPARISONS:
        raise AllocMoeError(f"tolerance file: {where}: kind {rule.kind!r}; allowed: {', '.join(COMPARISONS)}")
    if rule.direction not in DIRECTIONS:
        raise AllocMoeError(f"tolerance file: {where}: direction {rule.direction!r}; allowed: {', '.join(DIRECTIONS)}")
    if rule.unit not in UNITS:
        raise AllocMoeError(f"tolerance file: {where}: unit {rule.unit!r}; allowed: {', '.join(UNITS)}")
    for name, allowed in (("tolerance", "a number >= 0 (.inf: reported, never a regression)"),
                          ("stderr_factor", "a finite number >= 0")):
        value = getattr(rule, name)
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if not number or not (math.isfinite(value) or (name == "tolerance" and value == math.inf)) or value < 0:
            raise AllocMoeError(f"tolerance file: {where}: {name} must be {allowed}, got {value!r}")
    return rule


def load_tolerances(path: str | Path | None) -> dict[str, TableSpec]:
    """TABLES with the overrides of a YAML file: {table: {value column: {rule fields..., by_metric: {name: {...}}}}}."""
    if path is None:
        return dict(TABLES)
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AllocMoeError(f"tolerance file {path} is not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise AllocMoeError(f"tolerance file {path} must be a mapping of table names ({', '.join(TABLES)})")
    specs = dict(TABLES)
    for table, columns in data.items():
        name = table if table in TABLES else f"{table}.csv"
        if name not in TABLES:
            raise AllocMoeError(f"tolerance file: unknown table {table!r}; allowed: {', '.join(TABLES)}")
        spec = specs[name]
        if not isinstance(columns, dict) or set(columns) - set(spec.metrics):
            raise AllocMoeError(f"tolerance file: {name} takes a mapping of its value column(s) {', '.join(spec.metrics)}")
        metrics, by_metric = dict(spec.metrics), dict(spec.by_metric)
        for col, raw in columns.items():
            raw = dict(raw) if isinstance(raw, dict) else raw
            per_name = raw.pop("by_metric", {}) if isinstance(raw, dict) else {}
            metrics[col] = _check_rule(f"{name}.{col}", replace(metrics[col], **_rule_overrides(f"{name}.{col}", raw)))
            if per_name and not spec.metric_key:
                raise AllocMoeError(f"tolerance file: {name} has no metric key column, so by_metric is not allowed there")
            for metric, override in (per_name or {}).items():
                where = f"{name}.{col}.by_metric.{metric}"
                by_metric[str(metric)] = {**by_metric.get(str(metric), {}), **_rule_overrides(where, override)}
                _check_rule(where, replace(metrics[col], **by_metric[str(metric)]))
        specs[name] = replace(spec, metrics=metrics, by_metric=by_metric)
    return specs


# ---- comparison ---------------------------------------------------------------------------------------------

def _key_text(keys, values) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values))


def _scale(rule: Rule, values: pd.Series) -> float:
    """Points rules work in 0-100: fractions are multiplied by 100."""
    if rule.kind != "points" or rule.unit == "percent":
        return 1.0
    if rule.unit == "fraction":
        return 100.0
    finite = values[values.notna()]
    return 100.0 if ((finite >= 0) & (finite <= 1)).all() else 1.0


def classify(delta: float, threshold: float, direction: str) -> str:
    """'regressed' if the change goes the worse way by more than the threshold, 'improved' the better way, else 'ok'."""
    worse = {"higher": -delta, "lower": delta, "either": abs(delta)}[direction]
    better = {"higher": delta, "lower": -delta, "either": -math.inf}[direction]
    slack = threshold * (1 + 1e-9) + 1e-12  # a change of exactly the tolerance is within it
    return "regressed" if worse > slack else "improved" if better > slack else "ok"


def _compare_values(base: float, cur: float, base_se: float, cur_se: float, rule: Rule, scale: float):
    if math.isnan(base) and math.isnan(cur):
        return math.nan, rule.tolerance, "", "ok"
    if math.isnan(cur) or math.isnan(base):  # a value that disappeared regresses; one that appeared improves
        return math.nan, rule.tolerance, "", "regressed" if math.isnan(cur) else "improved"
    delta, threshold, unit = COMPARISONS[rule.kind](base, cur, base_se, cur_se, rule, scale)
    return delta, threshold, unit, classify(delta, threshold, rule.direction)


def compare_table(name: str, spec: TableSpec, base: pd.DataFrame, cur: pd.DataFrame) -> list[dict]:
    """One report row per (key, value column) present in either run."""
    rows = []
    keys = sorted(set(base.index) | set(cur.index))
    for col, default in spec.metrics.items():
        for key in keys:
            key = key if isinstance(key, tuple) else (key,)
            rule = default
            if spec.metric_key:
                rule = replace(default, **spec.by_metric.get(key[spec.keys.index(spec.metric_key)], {}))
            row = {"table": name, "key": _key_text(spec.keys, key), "column": col, "baseline": math.nan,
                   "current": math.nan, "change": math.nan, "threshold": math.nan, "unit": "", "status": ""}
            if key not in cur.index:
                rows.append({**row, "baseline": base.loc[key, col], "status": "missing"})
                continue
            if key not in base.index:
                rows.append({**row, "current": cur.loc[key, col], "status": "new"})
                continue
            group = _metric_group(spec, base, cur, key, col)
            scale = _scale(rule, group)
            se = (base.loc[key, spec.stderr], cur.loc[key, spec.stderr]) if spec.stderr else (math.nan, math.nan)
            b, c = float(base.loc[key, col]), float(cur.loc[key, col])
            delta, threshold, unit, status = _compare_values(b, c, float(se[0]), float(se[1]), rule, scale)
            rows.append({**row, "baseline": b, "current": c, "change": delta, "threshold": threshold, "unit": unit,
                         "status": status})
    return rows


def _metric_group(spec: TableSpec, base, cur, key, col) -> pd.Series:
    """The values (both runs) that share this row's metric name: the unit of an accuracy is detected per metric."""
    if not spec.metric_key:
        return pd.concat([base[col], cur[col]])
    level = spec.keys.index(spec.metric_key)
    name = key[level]
    pick = lambda df: df[col][df.index.get_level_values(level) == name]
    return pd.concat([pick(base), pick(cur)])


def check_config(base_dir: Path, cur_dir: Path, allow_change: bool) -> list[str]:
    """Refuse runs of different configs (or without manifests) unless allowed; return notes for the report (commits,
    tables that no longer match their manifest's sha256)."""
    manifests = {d: read_manifest(d) for d in (base_dir, cur_dir)}
    absent = [str(d / MANIFEST) for d, m in manifests.items() if m is None]
    if absent:
        if not allow_change:
            raise AllocMoeError(f"no manifest ({', '.join(absent)}), so the configs cannot be checked; "
                                "pass --allow-config-change to compare anyway")
        return [f"no manifest: {', '.join(absent)} (config not checked)"]
    hb, hc = (manifests[d]["config_hash"] for d in (base_dir, cur_dir))
    notes = [f"baseline commit {manifests[base_dir].get('git_commit')}, current commit {manifests[cur_dir].get('git_commit')}"]
    hw = {d: (m.get("hardware") or {}).get("cpu_model") for d, m in manifests.items()}
    if hw[base_dir] and hw[cur_dir] and hw[base_dir] != hw[cur_dir]:  # float sums differ by CPU; long training amplifies them
        notes.append(f"CPUs differ (baseline {hw[base_dir]}, current {hw[cur_dir]}): a model the run trains can come out "
                     "as different as another seed (docs/guides/reproducibility.md); compare runs made on one CPU type")
    for role, d in (("baseline", base_dir), ("current", cur_dir)):
        changed = changed_files(d, manifests[d])
        if changed:
            notes.append(f"{role}: {', '.join(changed)} no longer match(es) the sha256 in {d / MANIFEST} "
                         "(edited or removed after the run)")
    if hb != hc:
        if not allow_change:
            raise AllocMoeError(f"config hashes differ (baseline {hb[:12]}, current {hc[:12]}): the runs used different "
                                "configs; pass --allow-config-change to compare anyway")
        notes.append(f"config hashes differ (baseline {hb[:12]}, current {hc[:12]}): compared anyway")
    return notes


def regress(baseline: str | Path, current: str | Path, tolerance: str | Path | None = None,
            allow_config_change: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Compare two runs; returns the report (REPORT_COLUMNS, every compared row) and notes. Raises AllocMoeError."""
    specs = load_tolerances(tolerance)
    base_dir, cur_dir = summary_dir(baseline), summary_dir(current)
    notes = check_config(base_dir, cur_dir, allow_config_change)
    present = [name for name in specs if (base_dir / name).is_file()]
    if not present:
        raise AllocMoeError(f"{base_dir} holds none of the summary tables {', '.join(specs)}")
    lacking = [name for name in present if not (cur_dir / name).is_file()]
    if lacking:
        raise AllocMoeError(f"the current run lacks {', '.join(lacking)} ({cur_dir}) that the baseline has")
    notes += [f"{name}: only in the current run, not compared" for name in specs
              if name not in present and (cur_dir / name).is_file()]
    rows = []
    for name in present:
        spec = specs[name]
        rows += compare_table(name, spec, read_table(base_dir / name, spec), read_table(cur_dir / name, spec))
    return pd.DataFrame(rows, columns=REPORT_COLUMNS), notes


def failed(report: pd.DataFrame) -> bool:
    return bool(report["status"].isin(["regressed", "missing"]).any())


# ---- output -------------------------------------------------------------------------------------------------

def _fmt(x: float, unit: str = "") -> str:
    if isinstance(x, float) and math.isnan(x):
        return ""
    if unit == "rel":
        return f"{x:+.2%}"
    if unit in ("pt", "abs"):
        return f"{x:+.4g}" + (" pt" if unit == "pt" else "")
    return f"{x:.6g}"


def print_report(report: pd.DataFrame, notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 1000)  # logs: one line per row, however long its key
    for note in notes:
        console.print(f"note: {note}")
    moved = report[report["status"] != "ok"].copy()
    moved["order"] = moved["status"].map(STATUSES.index)
    table = Table(title="what moved")
    for col in REPORT_COLUMNS:
        table.add_column(col, justify="right" if col in ("baseline", "current", "change", "threshold") else "left")
    style = {"regressed": "bold red", "missing": "bold red", "improved": "green", "new": "cyan"}
    for r in moved.sort_values(["order", "table", "key"], kind="stable").itertuples():
        table.add_row(r.table, r.key, r.column, _fmt(r.baseline), _fmt(r.current), _fmt(r.change, r.unit),
                      _fmt(r.threshold, r.unit).lstrip("+"), r.unit, r.status, style=style.get(r.status))
    if len(moved):
        console.print(table)
    counts = report["status"].value_counts()
    console.print(f"{len(report)} values compared: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES))


def write_report(report: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        report.to_csv(tmp, index=False, float_format="%.10g", lineterminator="\n")


def _cmd_regress(args) -> int:
    if args.tolerance and not Path(args.tolerance).is_file():
        raise AllocMoeError(f"tolerance file {args.tolerance} does not exist")
    report, notes = regress(args.baseline, args.current, args.tolerance, args.allow_config_change)
    print_report(report, notes)
    if args.out:
        write_report(report, args.out)
    return 1 if failed(report) else 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "regress", help="compare two runs' summary tables; exit 1 on a regression",
        description="Compare the summary tables of two runs row by row on their key columns. Exit 0: nothing "
                    "regressed; 1: a metric moved the worse way beyond its tolerance or a baseline row is missing; "
                    "2: unusable input.")
    p.add_argument("--baseline", required=True, metavar="DIR", help="results directory (results) or its summary/")
    p.add_argument("--current", required=True, metavar="DIR", help="results directory (results) or its summary/")
    p.add_argument("--tolerance", metavar="FILE.yaml", help="per-table, per-metric tolerances (defaults built in)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="compare runs whose config hashes differ (or that have no manifest)")
    p.add_argument("--out", metavar="report.csv", help="write every compared value with its status to this CSV")
    p.set_defaults(func=_cmd_regress)
