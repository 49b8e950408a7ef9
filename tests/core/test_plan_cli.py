"""The plan artifact (schema + cross-field rules), `build_plan`, and the `alloc-moe plan` / `alloc-moe show` CLI."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alloc_moe import AllocMoeError, Plan, build_plan
from alloc_moe.cli import build_parser, main
from alloc_moe.core.layer_alloc import LAYER_METHODS
from alloc_moe.core.token_alloc import TOKEN_METHODS

CONSOLE_SCRIPT = Path(sys.executable).parent / "alloc-moe"
LAYERS = [1, 3, 5, 7]  # decoder-layer indices of the MoE layers (not 0-based on purpose)
K_ORIG = 4


def ppl_matrix(L=len(LAYERS), K=K_ORIG, seed=0) -> np.ndarray:
    """Perplexities that fall as a layer gets more experts, with different sensitivities per layer."""
    rng = np.random.default_rng(seed)
    steps = rng.random((L, K)) * rng.random((L, 1)) * 5 + 0.01
    return 10.0 + np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]


def write_csv(path: Path, layers=LAYERS, S=None, header="layer,k,value", sep=",", skip=None, override=None):
    S = ppl_matrix(len(layers), K_ORIG) if S is None else S
    lines = [header]
    for layer, row in zip(layers, S):
        for k, v in enumerate(row, start=1):
            if skip == (layer, k):
                continue
            value = override[1] if override and override[0] == (layer, k) else repr(float(v))
            lines.append(sep.join([str(layer), str(k), value]))
    path.write_text("\n".join(lines) + "\n")
    return path


def routing_scores(layers=LAYERS, K=K_ORIG, N=1500, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        probs = torch.softmax(torch.randn(N, 32, generator=g) * 3, dim=-1)
        out[layer] = probs.topk(K, dim=-1).values
    return out


def mean_acts_ref(method, scores, thr):
    """Mean activations per token of top-p (smallest prefix reaching p) or NAEE (p_j >= beta * p_1)."""
    s = scores.double().numpy()
    if method == "top-p":
        before = np.cumsum(s, axis=1) - s
        keep = before < thr
        keep[:, 0] = True
    else:
        keep = s >= thr * s[:, :1]
    return keep.sum(1).mean()


def valid_plan_dict(**over) -> dict:
    d = {
        "schema_version": 1, "model": "m", "moe_layers": [1, 3, 5, 7], "k_orig": 4, "budget": 10.0,
        "layer_method": "uniform", "k_per_layer": [2, 3, 2, 3], "token_allocation": "topk", "k_base": 1,
        "thresholds": None, "normalization": None, "provenance": {},
    }
    d.update(over)
    return d


def run_cli(argv, capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def listing(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


# ================================================================ Plan: round trip

@pytest.mark.parametrize("token_allocation", ["topk", "alloc-t", "top-p", "naee"])
def test_plan_save_load_resave_byte_identical(tmp_path, token_allocation):
    kw = dict(method="alloc-l", budget=10, moe_layers=LAYERS, k_orig=K_ORIG, sensitivity=ppl_matrix(),
              token_allocation=token_allocation, model="org/model",
              provenance={"command": "alloc-moe plan ...", "nested": {"a": [1, 2.5]}})
    if token_allocation in ("top-p", "naee"):
        kw["routing_scores"] = routing_scores(N=400)
    plan = build_plan(**kw)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    plan.save(a)
    loaded = Plan.load(a)
    assert loaded == plan
    loaded.save(b)
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text()) == plan.to_dict()
    assert list(json.loads(a.read_text()))[0] == "schema_version"
    assert listing(tmp_path) == {"a.json", "b.json"}  # no temp files left


def test_plan_fractional_roundtrip(tmp_path):
    p = Plan(**valid_plan_dict(budget=84 / 24 * 4, k_per_layer=[3.5] * 4, token_allocation="alloc-t", k_base=2))
    p.save(tmp_path / "p.json")
    q = Plan.load(tmp_path / "p.json")
    assert q.k_per_layer == [3.5] * 4 and q.k_base == 2
    q.save(tmp_path / "q.json")
    assert (tmp_path / "p.json").read_bytes() == (tmp_path / "q.json").read_bytes()


def test_plan_helpers():
    p = Plan(**valid_plan_dict())
    assert p.num_layers == 4 and p.k_for(5) == 2 and p.k_for(7) == 3


# ================================================================ Plan: schema violations

REQUIRED = ["schema_version", "model", "moe_layers", "k_orig", "budget", "layer_method", "k_per_layer",
            "token_allocation", "k_base"]


@pytest.mark.parametrize("field", REQUIRED)
def test_plan_missing_field(field):
    d = valid_plan_dict()
    del d[field]
    with pytest.raises(AllocMoeError) as e:
        Plan.from_dict(d)
    assert field in str(e.value) and "missing" in str(e.value)


@pytest.mark.parametrize("field,value", [
    ("k_orig", "4"), ("k_orig", 4.5), ("k_orig", True), ("budget", "10"), ("model", 5), ("model", ""),
    ("moe_layers", "1-4"), ("moe_layers", [1, 3, 5, 7.5]), ("moe_layers", []), ("k_per_layer", ["2", 3, 2, 3]),
    ("k_per_layer", 10), ("k_base", 1.5), ("k_base", -1), ("token_allocation", "random"), ("layer_method", "greedy"),
    ("schema_version", 2), ("provenance", []), ("normalization", "zscore"), ("budget", 0), ("budget", -3),
    ("moe_layers", [1, 1, 5, 7]),
])
def test_plan_wrong_type_or_value(field, value):
    d = valid_plan_dict(**{field: value})
    with pytest.raises(AllocMoeError) as e:
        Plan.from_dict(d)
    msg = str(e.value)
    assert msg.startswith("invalid plan") and "\n" not in msg
    assert field in msg or "plan:" in msg


def test_plan_unknown_field():
    with pytest.raises(AllocMoeError, match="unknown field.*colour"):
        Plan.from_dict(valid_plan_dict(colour="red"))


@pytest.mark.parametrize("over,pattern", [
    (dict(k_per_layer=[2, 5, 2, 1]), r"layer 3 has K=5.*k_orig=4"),
    (dict(k_per_layer=[2, 0, 2, 3]), r"layer 3 has K=0"),
    (dict(k_per_layer=[2.5, 2.5, 2, 3]), r"topk.*integer"),
    (dict(k_per_layer=[2, 3, 2]), r"3 entries for 4"),
    (dict(k_per_layer=[2, 3, 2, 3, 0]), r"5 entries for 4"),
    (dict(moe_layers=[1, 5, 3, 7]), r"ascending"),
    (dict(k_per_layer=[3, 3, 3, 3]), r"sums to 12.*budget 10"),
    (dict(k_base=5), r"k_base=5 exceeds k_orig=4"),
    (dict(token_allocation="top-p"), r"top-p.*threshold"),
    (dict(token_allocation="naee", thresholds=[0.1, 0.2]), r"naee.*threshold"),
    (dict(thresholds=[0.1, 0.2, 0.3, 0.4]), r"thresholds.*only"),
    (dict(token_allocation="top-p", thresholds=[0.1, 0.2, 1.5, 0.4]), r"thresholds/2"),
    (dict(token_allocation="alloc-t", k_base=3, budget=12, k_per_layer=[2.5, 2.5, 2.5, 2.5]), r"allowed 3\.\.k_orig=4"),
    (dict(token_allocation="alloc-t", k_base=3, k_per_layer=[3, 3, 3, 3]), r"budget 10.* between 12 and 16"),
])
def test_plan_cross_field_rules(over, pattern):
    with pytest.raises(AllocMoeError, match=pattern) as e:
        Plan(**valid_plan_dict(**over))
    assert str(e.value).startswith("invalid plan") and "\n" not in str(e.value)


def test_plan_fractional_k_ok_for_token_modes(tmp_path):
    """Fractional K is accepted for the token modes (and kept, through a save and load), refused for top-k."""
    for over in (dict(token_allocation="alloc-t", k_per_layer=[2.5] * 4),
                 dict(token_allocation="top-p", k_per_layer=[2.5] * 4, thresholds=[0.5] * 4)):
        plan = Plan(**valid_plan_dict(**over))
        assert plan.k_per_layer == [2.5] * 4 and plan.k_for(3) == 2.5
        plan.save(tmp_path / "p.json")
        assert Plan.load(tmp_path / "p.json") == plan
    with pytest.raises(AllocMoeError, match=r"K=2\.5; token_allocation 'topk' needs integers"):
        Plan(**valid_plan_dict(token_allocation="topk", k_per_layer=[2.5] * 4))


@pytest.mark.parametrize("content,pattern", [
    ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('"plan"', "JSON object"), ("", "not valid JSON"),
])
def test_plan_load_bad_files(tmp_path, content, pattern):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(AllocMoeError, match=pattern):
        Plan.load(f)
    with pytest.raises(AllocMoeError, match="not found"):
        Plan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("budget", [float("nan"), float("inf")])
def test_plan_rejects_non_finite_budget(budget):
    with pytest.raises(AllocMoeError):
        Plan(**valid_plan_dict(budget=budget))



def test_plan_rejects_nan_threshold():
    with pytest.raises(AllocMoeError):
        Plan(**valid_plan_dict(token_allocation="top-p", thresholds=[0.5, float("nan"), 0.5, 0.5]))



def test_plan_rejects_budget_above_range():
    with pytest.raises(AllocMoeError):
        Plan(**valid_plan_dict(budget=1000.0))


# ================================================================ build_plan

SCORES = routing_scores(N=1000)


@pytest.mark.parametrize("token_allocation", list(TOKEN_METHODS))
@pytest.mark.parametrize("method", list(LAYER_METHODS))
def test_build_plan_every_combination(method, token_allocation):
    B = 10
    kw = dict(method=method, budget=B, moe_layers=LAYERS, k_orig=K_ORIG, token_allocation=token_allocation,
              model="m")
    if method in ("alloc-l", "lexi"):
        S = ppl_matrix()
        kw["sensitivity"] = S if method == "alloc-l" else S - S[:, -1:]  # LExI: deviations, 0 at K_orig
    if token_allocation in ("top-p", "naee"):
        kw["routing_scores"] = SCORES
    plan = build_plan(**kw)
    assert isinstance(plan, Plan)
    Plan.from_dict(json.loads(json.dumps(plan.to_dict())))  # what is saved is valid
    assert plan.layer_method == method and plan.token_allocation == token_allocation
    assert plan.moe_layers == LAYERS and plan.k_orig == K_ORIG and plan.budget == B
    assert len(plan.k_per_layer) == len(LAYERS)
    assert all(1 <= k <= K_ORIG for k in plan.k_per_layer)
    assert sum(plan.k_per_layer) <= B + 1e-9
    if token_allocation == "topk":
        assert all(type(k) is int for k in plan.k_per_layer) and sum(plan.k_per_layer) == B
    else:
        assert all(type(k) is float for k in plan.k_per_layer)
    if method == "uniform" and token_allocation != "topk":
        assert plan.k_per_layer == [B / len(LAYERS)] * len(LAYERS)  # the fractional share 2.5
    assert plan.normalization == ("relative" if method == "alloc-l" else None)
    if token_allocation in ("top-p", "naee"):
        assert len(plan.thresholds) == len(LAYERS)
        for layer, k, thr in zip(LAYERS, plan.k_per_layer, plan.thresholds):
            assert 0 <= thr <= 1
            assert abs(mean_acts_ref(token_allocation, SCORES[layer], thr) - k) <= 0.005 * k + 2 / 1000
    else:
        assert plan.thresholds is None


def test_build_plan_alloc_l_uses_normalisation():
    S = np.array([[20.0, 10.0], [120.0, 100.0], [50.0, 49.0]])  # relative and absolute optima differ
    common = dict(method="alloc-l", budget=5, moe_layers=[0, 1, 2], k_orig=2, sensitivity=S)
    assert build_plan(**common).normalization == "relative"  # the default
    none = build_plan(**common, normalization="none")
    assert none.normalization == "none"
    # absolute ppl: shrinking layer 2 costs 1, layer 0 costs 10, layer 1 costs 20 (budget 5: one layer at k=1)
    assert none.k_per_layer == [2, 2, 1]
    rel = build_plan(**common, normalization="relative")
    # relative: layer 0 +100 %, layer 1 +20 %, layer 2 +2 %
    assert rel.k_per_layer == [2, 2, 1] and rel.normalization == "relative"
    S2 = np.array([[20.0, 10.0], [120.0, 100.0]])
    assert build_plan(method="alloc-l", budget=3, moe_layers=[0, 1], k_orig=2, sensitivity=S2,
                      normalization="none").k_per_layer == [1, 2]
    assert build_plan(method="alloc-l", budget=3, moe_layers=[0, 1], k_orig=2, sensitivity=S2).k_per_layer == [2, 1]


def test_build_plan_alloc_t_k_base():
    plan = build_plan(method="uniform", budget=12, moe_layers=LAYERS, k_orig=K_ORIG, token_allocation="alloc-t", k_base=2)
    assert plan.k_base == 2 and plan.k_per_layer == [3.0] * 4
    assert build_plan(method="uniform", budget=12, moe_layers=LAYERS, k_orig=K_ORIG, k_base=3).k_base == 1  # topk


@pytest.mark.parametrize("kw,pattern", [
    (dict(method="greedy"), "unknown layer method"),
    (dict(token_allocation="random"), "unknown token allocation"),
    (dict(token_allocation="top-p"), "routing"),
    (dict(token_allocation="naee", routing_scores={1: SCORES[1]}), r"lack MoE layer"),
    (dict(budget=3), r"between 4 and 16"),
    (dict(budget=17), r"between 4 and 16"),
    (dict(budget=6, token_allocation="alloc-t", k_base=2), r"between 8 and 16"),
    (dict(method="ascending", budget=9, token_allocation="alloc-t", k_base=2), r"k_base"),
    (dict(method="alloc-l"), "sensitivity"),
    (dict(method="lexi", sensitivity=np.ones((3, 4))), "shape"),
])
def test_build_plan_errors(kw, pattern):
    args = dict(method="uniform", budget=10, moe_layers=LAYERS, k_orig=K_ORIG)
    args.update(kw)
    with pytest.raises(AllocMoeError, match=pattern):
        build_plan(**args)


# ================================================================ CLI: plan / show

@pytest.fixture
def csv_file(tmp_path):
    return write_csv(tmp_path / "S.csv")


@pytest.mark.parametrize("method", list(LAYER_METHODS))
def test_cli_plan_each_method(method, tmp_path, csv_file, capsys):
    out = tmp_path / f"{method}.json"
    code, stdout, err = run_cli(["plan", "--sensitivity", csv_file, "--budget", 11, "--method", method,
                                 "--model", "toy", "--out", out], capsys)
    assert code == 0, err
    assert err == ""
    plan = Plan.load(out)
    assert plan.layer_method == method and plan.moe_layers == LAYERS and plan.k_orig == K_ORIG
    assert sum(plan.k_per_layer) == 11 and plan.model == "toy"
    assert plan.provenance["sensitivity_sha256"]
    assert str(out) in stdout
    assert listing(tmp_path) == {"S.csv", f"{method}.json"}


def test_cli_plan_alloc_l_matches_brute_force(tmp_path, capsys):
    S = ppl_matrix(seed=4)
    write_csv(tmp_path / "S.csv", S=S)
    for norm, T in [("none", S), ("relative", S / S[:, -1:] - 1), ("log", np.log(S) - np.log(S[:, -1:]))]:
        code, _, err = run_cli(["plan", "--sensitivity", tmp_path / "S.csv", "--budget", 9, "--method", "alloc-l",
                                "--normalization", norm, "--out", tmp_path / f"{norm}.json"], capsys)
        assert code == 0, err
        ks = Plan.load(tmp_path / f"{norm}.json").k_per_layer
        import itertools
        best = min(sum(T[i, k - 1] for i, k in enumerate(v))
                   for v in itertools.product(range(1, 5), repeat=4) if sum(v) <= 9)
        assert abs(sum(T[i, k - 1] for i, k in enumerate(ks)) - best) <= 1e-12


@pytest.mark.parametrize("method", ["uniform", "ascending", "descending"])
def test_cli_plan_data_free(method, tmp_path, capsys):
    out = tmp_path / "p.json"
    code, _, err = run_cli(["plan", "--moe-layers", "1-26", "--k-orig", 6, "--budget", 104, "--method", method,
                            "--out", out], capsys)
    assert code == 0, err
    plan = Plan.load(out)
    assert plan.moe_layers == list(range(1, 27)) and sum(plan.k_per_layer) == 104


def test_cli_plan_alloc_t_fractional(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, _, err = run_cli(["plan", "--moe-layers", "0,2,4,6", "--k-orig", 4, "--budget", 14, "--method", "uniform",
                            "--token-allocation", "alloc-t", "--k-base", 2, "--out", out], capsys)
    assert code == 0, err
    plan = Plan.load(out)
    assert plan.k_per_layer == [3.5] * 4 and plan.k_base == 2 and plan.moe_layers == [0, 2, 4, 6]


@pytest.mark.parametrize("method", ["top-p", "naee"])
def test_cli_plan_threshold_modes(method, tmp_path, csv_file, capsys):
    rs = tmp_path / "scores.pt"
    torch.save({"format": "alloc-moe-routing-scores", "version": 1, "scores": SCORES}, rs)
    out = tmp_path / "p.json"
    code, _, err = run_cli(["plan", "--sensitivity", csv_file, "--budget", 10, "--method", "alloc-l",
                            "--token-allocation", method, "--routing-scores", rs, "--out", out], capsys)
    assert code == 0, err
    plan = Plan.load(out)
    assert plan.thresholds is not None and len(plan.thresholds) == 4
    # the same scores saved again (another file: torch.save's serialization id differs) give a byte-identical plan
    rs2 = tmp_path / "again.pt"
    torch.save({"format": "alloc-moe-routing-scores", "version": 1, "scores": SCORES}, rs2)
    assert rs2.read_bytes() != rs.read_bytes()
    out2 = tmp_path / "p2.json"
    assert run_cli(["plan", "--sensitivity", csv_file, "--budget", 10, "--method", "alloc-l", "--token-allocation",
                    method, "--routing-scores", rs2, "--out", out2], capsys)[0] == 0
    text = out.read_text()
    assert out2.read_text() == text.replace(str(rs), str(rs2)).replace(str(out), str(out2))
    assert len(plan.provenance["routing_scores_content_sha256"]) == 64


def test_cli_show_prints_every_layer(tmp_path, capsys):
    out = tmp_path / "p.json"
    layers = "2,4,6,8,10,12,14,16,18,20,22,24"
    assert run_cli(["plan", "--moe-layers", layers, "--k-orig", 6, "--budget", 50, "--method", "ascending",
                    "--out", out], capsys)[0] == 0
    plan = Plan.load(out)
    code, stdout, err = run_cli(["show", out], capsys)
    assert code == 0 and err == ""
    rows = [tuple(int(x) for x in m) for m in re.findall(r"^\W*(\d+)\W+(\d+)\W+(\d+)\W*$", stdout, flags=re.M)]
    assert rows == [(i, layer, k) for i, (layer, k) in enumerate(zip(plan.moe_layers, plan.k_per_layer))]
    assert "ascending" in stdout and "50" in stdout


def test_cli_show_thresholds(tmp_path, capsys):
    p = tmp_path / "p.json"
    Plan(**valid_plan_dict(token_allocation="naee", k_per_layer=[2.5] * 4, thresholds=[0.125, 0.25, 0.5, 0.75])).save(p)
    code, stdout, _ = run_cli(["show", p], capsys)
    assert code == 0
    for t in ("0.1250", "0.2500", "0.5000", "0.7500"):
        assert t in stdout
    assert "beta" in stdout


def test_cli_plan_byte_identical_twice(tmp_path, csv_file, capsys):
    out = tmp_path / "p.json"
    argv = ["plan", "--sensitivity", csv_file, "--budget", 10, "--method", "alloc-l", "--out", out]
    assert run_cli(argv, capsys)[0] == 0
    first = out.read_bytes()
    assert run_cli(argv, capsys)[0] == 0
    assert out.read_bytes() == first
    # a different output path changes only the recorded command
    out2 = tmp_path / "q.json"
    assert run_cli(argv[:-1] + [out2], capsys)[0] == 0
    a, b = json.loads(first), json.loads(out2.read_bytes())
    a["provenance"].pop("command"), b["provenance"].pop("command")
    assert a == b


# ---------------------------------------------------------------- CLI: bad input

def _bad_cases(tmp: Path):
    csv = write_csv(tmp / "S.csv")
    cases = {
        "budget-low": (["--budget", 3], ["4", "16"]),
        "budget-high": (["--budget", 16.5], ["4", "16"]),
        "budget-negative": (["--budget", -5], ["4", "16"]),
        "budget-nan": (["--budget", "nan"], ["4", "16"]),
        "budget-inf": (["--budget", "inf"], ["4", "16"]),
        "budget-not-number": (["--budget", "ten"], ["budget"]),
        "missing-cell": (["--sensitivity", write_csv(tmp / "m.csv", skip=(5, 3))], ["layer=5", "k=3"]),
        "wrong-header": (["--sensitivity", write_csv(tmp / "h.csv", header="layer,topk,ppl")], ["header"]),
        "semicolon": (["--sensitivity", write_csv(tmp / "sc.csv", header="layer;k;value", sep=";")], ["header"]),
        "semicolon-rows": (["--sensitivity", write_csv(tmp / "sr.csv", sep=";")], ["comma-separated"]),
        "missing-file": (["--sensitivity", tmp / "nope.csv"], ["not found"]),
        "nan-value": (["--sensitivity", write_csv(tmp / "n.csv", override=((3, 2), "nan"))], ["finite"]),
        "inf-value": (["--sensitivity", write_csv(tmp / "i.csv", override=((3, 2), "inf"))], ["finite"]),
        "text-value": (["--sensitivity", write_csv(tmp / "t.csv", override=((3, 2), "abc"))], ["number"]),
        "negative-layer": (["--sensitivity", write_csv(tmp / "nl.csv", layers=[-1, 3, 5, 7])], ["layer"]),
        "duplicate-cell": (["--sensitivity", write_csv(tmp / "d.csv", layers=[1, 1, 5, 7])], ["duplicate"]),
        "empty-file": (["--sensitivity", tmp / "e.csv"], ["header"]),
        "unknown-method": (["--method", "greedy"], ["greedy"]),
        "unknown-token-allocation": (["--token-allocation", "random"], ["random"]),
        "unknown-normalization": (["--normalization", "zscore"], ["zscore"]),
        "top-p-without-scores": (["--token-allocation", "top-p"], ["routing"]),
        "missing-routing-scores": (["--token-allocation", "top-p", "--routing-scores", tmp / "no.pt"], ["not found"]),
        "k-base-too-high": (["--token-allocation", "alloc-t", "--k-base", 5], ["k_base"]),
        "k-base-negative": (["--token-allocation", "alloc-t", "--k-base", -1], ["k_base"]),
        "layers-disagree": (["--moe-layers", "0-3"], ["disagree"]),
        "bad-layers": (["--moe-layers", "a-b"], ["layer"]),
    }
    (tmp / "e.csv").write_text("")
    return csv, cases


def _bad_case_names():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return list(_bad_cases(Path(d))[1])


BAD_CASE_NAMES = _bad_case_names()


def assert_one_line_error(code, out, err):
    assert code == 2, (code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "error" in err


@pytest.mark.parametrize("name", BAD_CASE_NAMES)
def test_cli_plan_bad_input(name, tmp_path, capsys):
    csv, cases = _bad_cases(tmp_path)
    extra, needles = cases[name]
    argv = ["plan", "--sensitivity", csv, "--budget", 10, "--method", "alloc-l", "--out", tmp_path / "out.json"]
    # later options override earlier ones of the same name (argparse keeps the last)
    before = listing(tmp_path)
    code, out, err = run_cli(argv + extra, capsys)
    assert_one_line_error(code, out, err)
    for n in needles:
        assert n in err, (n, err)
    assert listing(tmp_path) == before  # no plan, no temp file


def test_cli_data_free_needs_layers(tmp_path, capsys):
    for argv in (["--method", "uniform"], ["--method", "uniform", "--moe-layers", "1-4"],
                 ["--method", "alloc-l", "--moe-layers", "1-4", "--k-orig", 4]):
        before = listing(tmp_path)
        code, out, err = run_cli(["plan", "--budget", 8, "--out", tmp_path / "o.json", *argv], capsys)
        assert_one_line_error(code, out, err)
        assert listing(tmp_path) == before


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["plan"], ["show"], ["plan", "--budget", 4]])
def test_cli_usage_errors(argv, capsys):
    assert_one_line_error(*run_cli(argv, capsys))


@pytest.mark.parametrize("content,needle", [
    (None, "not found"), ("{", "not valid JSON"), ("[]", "JSON object"),
    (json.dumps(valid_plan_dict(k_per_layer=[2, 5, 2, 1])), "K=5"),
    (json.dumps(valid_plan_dict(colour="red")), "colour"),
    (json.dumps({k: v for k, v in valid_plan_dict().items() if k != "budget"}), "budget"),
    (json.dumps(valid_plan_dict(k_orig="4")), "k_orig"),
    (json.dumps(valid_plan_dict(token_allocation="top-p")), "threshold"),
])
def test_cli_show_bad_plan(content, needle, tmp_path, capsys):
    p = tmp_path / "p.json"
    if content is not None:
        p.write_text(content)
    before = listing(tmp_path)
    code, out, err = run_cli(["show", p], capsys)
    assert_one_line_error(code, out, err)
    assert needle in err
    assert listing(tmp_path) == before


def test_cli_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = list(sub.choices)
    assert {"plan", "show"} <= set(commands)
    for argv in [["--help"], ["-h"]] + [[c, "--help"] for c in commands]:
        code, out, err = run_cli(argv, capsys)
        assert code == 0, argv
        assert "usage:" in out and err == ""
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("alloc-moe ")


def test_commands_table_is_what_the_modules_register():
    """`cli.COMMANDS` (command -> module) is exactly what each module's `register_cli` adds, and the full parser has
    every command: a job that names its command imports only that module, so the table must not drift."""
    import argparse
    import importlib

    from alloc_moe.cli import COMMAND_MODULES, COMMANDS

    registered = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"alloc_moe.{name}").register_cli(sub)
        registered.update({c: name for c in sub.choices})
    assert registered == COMMANDS
    full = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(full.choices) == set(COMMANDS)
    for command, module in COMMANDS.items():
        one = next(a for a in build_parser(command)._actions if a.__class__.__name__ == "_SubParsersAction")
        assert set(one.choices) == {c for c, m in COMMANDS.items() if m == module}


def test_a_command_imports_only_its_own_module():
    """`alloc-moe make-corpus --help` in a fresh interpreter loads neither torch nor another command's module
    (workflow jobs start one CLI process each; before, every job imported all 15 command modules, torch with them);
    `alloc-moe --help` still lists every command; an unknown command is one line."""
    import subprocess
    import sys

    code = ("import sys; from alloc_moe.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'torch' in sys.modules, 'alloc_moe.stages.accuracy' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, "make-corpus", "--help"], capture_output=True, text=True,
                         check=True)
    assert "usage: alloc-moe make-corpus" in res.stdout and res.stdout.strip().endswith("LOADED False False")
    res = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True)
    assert "load-balance" in res.stdout and "make-tasks" in res.stdout
    res = subprocess.run([sys.executable, "-m", "alloc_moe", "no-such-command"], capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice: 'no-such-command'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_planning_top_k_and_alloc_t_imports_no_torch(tmp_path):
    """`alloc-moe plan` for a top-k or Alloc-T plan runs without torch (a workflow job per plan: ~40 in the main
    job, each ~0.9 s faster); top-p and NAEE load recorded routing scores and need it."""
    csv = write_csv(tmp_path / "S.csv")
    code = ("import sys; from alloc_moe.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "print('TORCH', 'torch' in sys.modules, rc)")
    for mode in ("topk", "alloc-t"):
        out = tmp_path / f"{mode}.json"
        res = subprocess.run([sys.executable, "-c", code, "plan", "--sensitivity", str(csv), "--budget", "10",
                              "--method", "alloc-l", "--token-allocation", mode, "--out", str(out)],
                             capture_output=True, text=True, check=True)
        assert res.stdout.strip().endswith("TORCH False 0"), res.stdout + res.stderr
        assert Plan.load(out).token_allocation == mode


def test_console_script_subprocess(tmp_path):
    """The installed `alloc-moe` entry point (one real process: exit code and the recorded command line)."""
    csv = write_csv(tmp_path / "S.csv")
    out = tmp_path / "p.json"
    argv = ["plan", "--sensitivity", str(csv), "--budget", "10", "--method", "alloc-l", "--out", str(out)]
    r = subprocess.run([str(CONSOLE_SCRIPT), *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = Plan.load(out)
    assert sum(plan.k_per_layer) == 10
    assert plan.provenance["command"] == shlex.join(["alloc-moe", *argv])


# ---------------------------------------------------------------- CLI: defects found in review (now fixed)

def test_cli_in_process_provenance_records_argv(tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["plan", "--moe-layers", "1-4", "--k-orig", "4", "--budget", "8", "--method", "uniform", "--out", str(out)]
    assert run_cli(argv, capsys)[0] == 0
    assert Plan.load(out).provenance["command"] == shlex.join(["alloc-moe", *argv])


def test_cli_plan_file_respects_umask(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert run_cli(["plan", "--moe-layers", "1-4", "--k-orig", "4", "--budget", "8", "--method", "uniform",
                    "--out", out], capsys)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_out_is_directory(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    before = listing(tmp_path / "dir")
    code, out, err = run_cli(["plan", "--moe-layers", "1-4", "--k-orig", "4", "--budget", "8", "--method", "uniform",
                              "--out", tmp_path / "dir"], capsys)
    assert_one_line_error(code, out, err)
    assert listing(tmp_path / "dir") == before
