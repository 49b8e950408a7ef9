"""The plan artifact: one model's per-layer activation budget, as JSON validated by `schemas/plan.schema.json`."""

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from ..errors import AllocMoeError
from ..io import atomic_write_text
from .budget import check_budget

SCHEMA_VERSION = 1


def plan_schema() -> dict:
    return json.loads((resources.files("alloc_moe") / "schemas" / "plan.schema.json").read_text())


# The token modes a plan may name (the schema's enum; each is a `core.token_alloc.TOKEN_METHODS` entry, and
# tests/core/test_token_alloc.py::test_token_methods_registry checks that the two agree), and those that carry
# per-layer thresholds. Read here, not from token_alloc, so that planning imports no torch: a top-k or Alloc-T plan
# job takes ~0.23 s instead of ~1.5 s (the main job has ~40).
TOKEN_ALLOCATIONS = tuple(plan_schema()["properties"]["token_allocation"]["enum"])
THRESHOLD_ALLOCATIONS = ("top-p", "naee")


@dataclasses.dataclass
class Plan:
    model: str
    moe_layers: list[int]
    k_orig: int
    budget: float
    layer_method: str
    k_per_layer: list[float]
    token_allocation: str = "topk"
    k_base: int = 1
    thresholds: list[float] | None = None
    normalization: str | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def k_for(self, decoder_layer: int) -> float:
        return self.k_per_layer[self.moe_layers.index(decoder_layer)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: d[k] for k in ["schema_version", *[f.name for f in dataclasses.fields(self) if f.name != "schema_version"]]}

    def validate(self) -> None:
        """Schema check, then the cross-field rules a schema cannot say."""
        d = dataclasses.asdict(self)
        try:
            jsonschema.validate(d, plan_schema())
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "plan"
            raise AllocMoeError(f"invalid plan: {where}: {e.message}") from None
        L, K = self.num_layers, self.k_orig
        if not math.isfinite(self.budget):
            raise AllocMoeError(f"invalid plan: budget must be finite, got {self.budget}")
        try:
            check_budget(self.budget, L, K, self.k_base if self.token_allocation == "alloc-t" else 1)
        except AllocMoeError as e:
            raise AllocMoeError(f"invalid plan: {e}") from None
        if self.thresholds is not None and not all(math.isfinite(t) for t in self.thresholds):
            raise AllocMoeError("invalid plan: thresholds must be finite numbers in [0, 1]")
        if list(self.moe_layers) != sorted(self.moe_layers):
            raise AllocMoeError("invalid plan: moe_layers must be ascending decoder-layer indices")
        if len(self.k_per_layer) != L:
            raise AllocMoeError(f"invalid plan: k_per_layer has {len(self.k_per_layer)} entries for {L} moe_layers")
        lo = max(1, self.k_base) if self.token_allocation == "alloc-t" else 1
        for layer, k in zip(self.moe_layers, self.k_per_layer):
            if not lo <= k <= K:
                raise AllocMoeError(f"invalid plan: layer {layer} has K={k}; allowed {lo}..k_orig={K}")
            if self.token_allocation == "topk" and k != int(k):
                raise AllocMoeError(f"invalid plan: layer {layer} has K={k}; token_allocation 'topk' needs integers (use alloc-t for fractional K)")
        if self.k_base > K:
            raise AllocMoeError(f"invalid plan: k_base={self.k_base} exceeds k_orig={K}")
        if sum(self.k_per_layer) > self.budget + 1e-6:
            raise AllocMoeError(f"invalid plan: k_per_layer sums to {sum(self.k_per_layer)}, above the budget {self.budget}")
        needs = self.token_allocation in THRESHOLD_ALLOCATIONS
        if needs and (self.thresholds is None or len(self.thresholds) != L):
            raise AllocMoeError(f"invalid plan: token_allocation {self.token_allocation!r} needs one threshold per MoE layer ({L})")
        if not needs and self.thresholds is not None:
            raise AllocMoeError(f"invalid plan: thresholds are only used by top-p and naee, not {self.token_allocation!r}")
        if any(not math.isfinite(x) for x in self.k_per_layer):
            raise AllocMoeError("invalid plan: k_per_layer has NaN or inf")

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise AllocMoeError("invalid plan: top level must be a JSON object")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise AllocMoeError(f"invalid plan: unknown field(s) {', '.join(sorted(unknown))}")
        missing = set(plan_schema()["required"]) - set(d)
        if missing:
            raise AllocMoeError(f"invalid plan: missing field(s) {', '.join(sorted(missing))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AllocMoeError(f"plan file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AllocMoeError(f"plan file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def as_plan(plan: "Plan | str | Path | dict") -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    return Plan.load(plan)


def build_plan(
    *,
    method: str,
    budget: float,
    moe_layers: list[int],
    k_orig: int,
    sensitivity=None,
    token_allocation: str = "topk",
    k_base: int = 1,
    normalization: str | None = None,
    routing_scores: dict | None = None,
    model: str = "unspecified",
    provenance: dict | None = None,
    exact_budget: bool = False,
) -> Plan:
    """Allocate K per layer with a registered layer method, calibrate thresholds if the token mode needs them.

    `routing_scores` maps decoder-layer index -> recorded candidate scores [N, K_orig] (needed by top-p and naee).
    Top-k needs integer K per layer; the token modes accept the fractional uniform share B / L.
    """
    from .layer_alloc import DEFAULT_NORMALIZATION, LAYER_METHODS, allocate_layers

    if method not in LAYER_METHODS:
        raise AllocMoeError(f"unknown layer method {method!r}; allowed: {', '.join(LAYER_METHODS)}")
    if token_allocation not in TOKEN_ALLOCATIONS:
        raise AllocMoeError(f"unknown token allocation {token_allocation!r}; allowed: {', '.join(TOKEN_ALLOCATIONS)}")
    L = len(moe_layers)
    kb = k_base if token_allocation == "alloc-t" else 1
    budget = check_budget(budget, L, k_orig, kb)
    kwargs = dict(budget=budget, num_layers=L, k_orig=k_orig, sensitivity=sensitivity,
                  integer=token_allocation == "topk" or method != "uniform")
    if method == "alloc-l":
        normalization = normalization or DEFAULT_NORMALIZATION
        kwargs["normalization"] = normalization
    else:
        normalization = None
    if method in ("alloc-l", "lexi"):
        kwargs["exact"] = exact_budget
    ks = allocate_layers(method, **kwargs)
    if token_allocation == "alloc-t" and min(ks) < k_base:
        raise AllocMoeError(
            f"{method} gives some layer K={min(ks)} < k_base={k_base}; lower --k-base or raise the budget"
        )
    thresholds = None
    if token_allocation in THRESHOLD_ALLOCATIONS:
        from .calibration import calibrate_threshold  # torch: only the thresholded modes need it

        if routing_scores is None:
            raise AllocMoeError(f"token allocation {token_allocation!r} needs recorded routing probabilities (--routing-scores)")
        missing = [l for l in moe_layers if l not in routing_scores]
        if missing:
            raise AllocMoeError(f"routing scores lack MoE layer(s) {missing[:5]}")
        thresholds = [calibrate_threshold(token_allocation, routing_scores[l], k) for l, k in zip(moe_layers, ks)]
    return Plan(
        model=model, moe_layers=list(moe_layers), k_orig=k_orig, budget=budget, layer_method=method,
        k_per_layer=[int(k) if token_allocation == "topk" else float(k) for k in ks],
        token_allocation=token_allocation, k_base=k_base if token_allocation == "alloc-t" else 1,
        thresholds=thresholds, normalization=normalization, provenance=provenance or {},
    )


ORIGINAL = "original"


def labelled_plans(paths: list[str]) -> list[tuple[str, "Plan | None"]]:
    """'original' or plan JSON paths -> [(label, Plan | None)], the original first (added when not given).

    Labels are file stems, or the paths when stems clash; each plan (and 'original') may be given once.
    """
    out = [(ORIGINAL, None) if p == ORIGINAL else (Path(p).stem, Plan.load(p)) for p in paths]
    if len({label for label, _ in out}) != len(out):
        out = [(ORIGINAL, None) if p == ORIGINAL else (str(p), plan) for p, (_, plan) in zip(paths, out)]
        if len({label for label, _ in out}) != len(out):
            raise AllocMoeError("each plan may be given once (and 'original' once)")
    original = [x for x in out if x[1] is None]
    return (original or [(ORIGINAL, None)]) + [x for x in out if x[1] is not None]
