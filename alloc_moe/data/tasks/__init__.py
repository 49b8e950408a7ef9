"""Task suites for `alloc-moe eval`: a registry from suite name to the lm-eval tasks it runs and how they score.

- `embedded`: the synthetic suite (`tasks/embedded.py`), generated locally and loaded by lm-eval offline; it is
  versioned: `embedded` is the current version, `embedded-v1` / `embedded-v2` name one
  (docs/results/task-suite-v2.md: what changed in v2 and why);
- `paper`: the paper's 20 datasets in its three groups (`tasks/paper.py`), resolved in lm-eval's registry (hub data).

A group score is the unweighted mean of its tasks' scores, with standard error sqrt(sum se_i^2) / n
(the tasks are scored on disjoint items), as the paper reports "the average performance within each task group".
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str  # lm-eval task, group or tag name
    group: str  # the paper's group: NLU, Reasoning or Math
    metric: str  # lm-eval metric name: acc, exact_match, ...
    filter: str | None = None  # lm-eval filter name in the result key "metric,filter"; None: the first one reported
    num_fewshot: int | None = None  # None: the task's own default
    kind: str = "task"  # task | group | tag (a tag's score is the mean of its member tasks)
    chance: float | None = None  # expected score of random guessing (embedded tasks), in points


GROUPS = ("NLU", "Reasoning", "Math")


def suite(name: str) -> list[TaskSpec]:
    """The tasks of suite `name` (one of SUITE_NAMES); one-line error naming the allowed names otherwise."""
    from . import embedded, paper

    if name in EMBEDDED_NAMES:
        return embedded.specs(embedded.version_of(name))
    if name == "paper":
        return paper.SUITE
    from ...errors import AllocMoeError

    raise AllocMoeError(f"unknown task suite {name!r}; allowed: {', '.join(SUITE_NAMES)}")


EMBEDDED_NAMES = ("embedded", "embedded-v1", "embedded-v2", "embedded-v3", "embedded-v4")  # = embedded.NAMES (checked by the tests)
SUITE_NAMES = (*EMBEDDED_NAMES, "paper")


def group_scores(rows: list[dict]) -> list[dict]:
    """Per group: mean of the task values and its standard error sqrt(sum se^2)/n (rows have group, value, stderr)."""
    out = []
    for g in sorted({r["group"] for r in rows}, key=lambda g: (GROUPS.index(g) if g in GROUPS else 99, g)):
        rs = [r for r in rows if r["group"] == g]
        value = sum(r["value"] for r in rs) / len(rs)
        ses = [r["stderr"] for r in rs]
        se = math.sqrt(sum(s * s for s in ses)) / len(rs) if all(s is not None and math.isfinite(s) for s in ses) else float("nan")
        out.append({"group": g, "value": value, "stderr": se, "n_tasks": len(rs)})
    return out
