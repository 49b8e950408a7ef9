"""`alloc-moe eval`: agreement with lm-eval called directly, plans change scores and computed pairs, byte-stable
output, the summary table, bad input."""

import json

import pytest
import torch

import alloc_moe.backends.hf.apply
from alloc_moe.cli import main
from alloc_moe.core.plan import Plan, build_plan
from alloc_moe.data import zoo
from alloc_moe.data.tasks import embedded
from alloc_moe.stages.accuracy import ROW_COLUMNS, evaluate, resolve_tasks

N = 40  # items per task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("acc")
    model = zoo.write_model(d / "model", arch="deepseek_v2", layers=3, router_std=1.0, seed=0)
    with torch.no_grad():  # random experts (std 0.02) barely move the residual stream: make them matter
        for m in alloc_moe.backends.hf.apply.moe_layers(model):
            for p in m.experts.parameters():
                p.mul_(40.0)
    model.save_pretrained(d / "model")
    embedded.write_suite(d / "tasks", items={t: N for t in embedded.ITEMS})
    embedded.write_suite(d / "tasks-v1", items={t: N for t in embedded.ITEMS_V1}, version=1)  # has a generation task
    model = zoo.make_model("deepseek_v2", layers=3, router_std=1.0, seed=0)
    layers = zoo.moe_layer_indices(model)
    k = zoo.k_orig(model)
    tight = build_plan(method="uniform", budget=len(layers), moe_layers=layers, k_orig=k, model="m")
    tight.save(d / "tight.json")
    alloct = build_plan(method="uniform", budget=len(layers) * 1.5, moe_layers=layers, k_orig=k, model="m",
                        token_allocation="alloc-t", k_base=1)
    alloct.save(d / "alloct.json")
    return d


def _eval(d, *extra):
    return main(["eval", "--model", str(d / "model"), "--tasks", "embedded", "--include-path", str(d / "tasks"),
                 "--batch-size", "16", *extra])


@pytest.mark.slow
def test_eval_matches_lm_eval_called_directly(setup):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import alloc_moe

    d = setup
    tasks = resolve_tasks(str(d / "tasks-v1" / "emb_yesno.yaml"))
    tasks += resolve_tasks(str(d / "tasks-v1" / "emb_arith_gen.yaml"))
    ours = evaluate(str(d / "model"), [None, alloc_moe.Plan.load(d / "alloct.json")], tasks, batch_size=16)
    model = AutoModelForCausalLM.from_pretrained(d / "model").eval()
    tok = AutoTokenizer.from_pretrained(d / "model")
    for res, plan in zip(ours, [None, d / "alloct.json"]):
        with alloc_moe.apply(model, plan):
            direct = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=16, add_bos_token=True),
                                             tasks=[t for _, t in tasks], log_samples=False, verbosity="ERROR")
        got = {r["task"]: r["value"] for r in res["rows"]}
        assert got["emb_yesno"] == pytest.approx(100 * direct["results"]["emb_yesno"]["acc,none"])
        assert got["emb_arith_gen"] == pytest.approx(100 * direct["results"]["emb_arith_gen"]["exact_match,first-number"])


def test_tight_plan_changes_scores_and_computed_pairs(setup, tmp_path):
    d = setup
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"family": "x", "text": "4 7 + 1 2 = 5 9 ; the cats eat bread ."}) + "\n"
                            for _ in range(4)))
    outs = [tmp_path / "orig.json", tmp_path / "tight.json"]
    assert _eval(d, "--plan", "original", "--out", str(outs[0]), "--plan", str(d / "tight.json"), "--out",
                 str(outs[1]), "--perplexity", str(text)) == 0
    orig, tight = (json.loads(p.read_text()) for p in outs)
    assert [list(r) for r in orig["rows"]] == [ROW_COLUMNS] * len(orig["rows"])
    assert orig["rows"][0]["layer_method"] == "original" and orig["rows"][0]["budget"] == 2 * 2  # 2 MoE layers x top-2
    assert tight["rows"][0]["layer_method"] == "uniform" and tight["rows"][0]["budget"] == 2
    assert [r["value"] for r in orig["rows"]] != [r["value"] for r in tight["rows"]]
    # pairs counted at the experts: top-1 computes half the pairs of top-2, on the tasks and on the text
    assert tight["activations_per_token"] == pytest.approx(orig["activations_per_token"] / 2)
    assert orig["perplexity"]["activations_per_token"] == 4 and tight["perplexity"]["activations_per_token"] == 2
    assert tight["perplexity"]["ppl"] != orig["perplexity"]["ppl"]
    assert {g["group"] for g in orig["groups"]} == {s.group for s in embedded.SUITE}  # v2: Reasoning, Math
    # per-item results (the claims' paired statistics): one 0/1 int per document, their mean is the task's score
    for res in (orig, tight):
        assert list(res)[-1] == "items" and sorted(res["items"]) == sorted(embedded.ITEMS)
        for row in res["rows"]:
            values = res["items"][row["task"]][row["task"]]
            assert len(values) == N and set(values) <= {0, 1}
            assert 100 * sum(values) / N == pytest.approx(row["value"], abs=1e-5)


def test_output_is_byte_stable(setup, tmp_path):
    d = setup
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for p in (a, b):
        assert _eval(d, "--plan", str(d / "alloct.json"), "--out", str(p), "--limit", "10") == 0
    assert a.read_bytes() == b.read_bytes()
    assert "date" not in a.read_text() and "time" not in json.loads(a.read_text())


def test_summary_table_and_group_scores(setup, tmp_path):
    from alloc_moe.report.summary import accuracy_table, group_table

    d = setup
    out = tmp_path / "o.json"
    assert _eval(d, "--out", str(out), "--limit", "10") == 0
    df = accuracy_table([out])
    assert list(df.columns) == ROW_COLUMNS and len(df) == len(embedded.ITEMS)
    g = group_table(df, k_base=1)
    grp = df[df.group == "Reasoning"]
    row = g[g.group == "Reasoning"].iloc[0]
    assert row.method == "Original" and row.value == pytest.approx(grp.value.mean())
    assert row.stderr == pytest.approx((grp.stderr ** 2).sum() ** 0.5 / len(grp))


@pytest.mark.parametrize("args, msg", [
    (["--tasks", "no_such_task_xyz"], "unknown task(s) no_such_task_xyz"),
    (["--tasks", "/nonexistent/tasks.yaml"], "task path /nonexistent/tasks.yaml not found"),
    (["--tasks", "embedded", "--backend", "tpu"], "unknown backend 'tpu'"),
    (["--tasks", "embedded", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--tasks", "embedded", "--plan", "a.json", "--plan", "b.json"], "give one --out per --plan"),
])
def test_bad_input_one_line_exit_2(setup, tmp_path, capsys, args, msg):
    d = setup
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(d / "model"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not out.exists()


def test_plan_for_another_model_fails_before_loading(setup, tmp_path, capsys):
    d = setup
    other = build_plan(method="uniform", budget=10, moe_layers=list(range(1, 6)), k_orig=2, model="other")
    other.save(tmp_path / "other.json")
    assert _eval(d, "--plan", str(tmp_path / "other.json"), "--out", str(tmp_path / "r.json")) == 2
    assert "plan is for MoE layers 1..5 (5 layers)" in capsys.readouterr().err


def test_missing_local_data_file(setup, tmp_path, capsys):
    d = setup
    (tmp_path / "t.yaml").write_text((d / "tasks-v1" / "emb_yesno.yaml").read_text())
    assert main(["eval", "--model", str(d / "model"), "--tasks", str(tmp_path / "t.yaml"), "--out",
                 str(tmp_path / "r.json")]) == 2
    assert "data file" in capsys.readouterr().err


def test_embedded_tasks_load_offline_and_a_trained_model_beats_chance(tmp_path, monkeypatch):
    """A tiny model trained for 500 steps (seconds) already scores above chance in Reasoning and Math, offline. The
    NLU task (emb_world_forms) asks what corpus v3's world says, which such a model has not learned yet (near chance,
    25): it is loaded and scored from 200 items, and the embedded default's models learn it (64-92%,
    docs/results/task-suite-v4-exploration.md)."""
    from alloc_moe.data.train import TrainConfig, train

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TrainConfig(width="tiny", layers=3, steps=500, batch_size=16, seq_len=32)
    train(cfg, tmp_path / "m", progress=False)
    embedded.write_suite(tmp_path / "tasks", items={t: 200 for t in embedded.ITEMS})
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", "embedded", "--include-path",
                 str(tmp_path / "tasks"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    chance = {}
    for r in res["rows"]:
        chance.setdefault(r["group"], []).append(res["chance"].get(r["task"], 0.0))
    margin = {"Reasoning": 5.0, "Math": 2.0}
    assert [g["group"] for g in res["groups"]] == ["NLU", "Reasoning", "Math"]
    assert len(res["items"]["emb_world_forms"]["emb_world_forms"]) == 200 and chance["NLU"] == [25.0]
    for g in res["groups"][1:]:
        base = sum(chance[g["group"]]) / len(chance[g["group"]])
        assert g["value"] >= base + margin[g["group"]], (g, base)


def test_task_items_of_a_task_a_group_and_a_tag():
    """Per-item values from lm-eval's sample logs: doc_id order, the spec's filter (else the first logged), a group's
    leaf tasks through group_subtasks, a tag's members through their configs' tags; ints where integral."""
    from alloc_moe.data.tasks import TaskSpec
    from alloc_moe.stages.accuracy import task_items

    res = {"samples": {"a1": [{"doc_id": 1, "filter": "f", "exact_match": 1.0},
                              {"doc_id": 0, "filter": "f", "exact_match": 0.0},
                              {"doc_id": 0, "filter": "g", "exact_match": 1.0}],
                       "a2": [{"doc_id": 0, "filter": "none", "exact_match": True}],
                       "boolq": [{"doc_id": 0, "filter": "none", "acc": 1}],
                       "mmlu_x": [{"doc_id": 0, "filter": "none", "acc": 0.25}],
                       "bleu_task": [{"doc_id": 0, "filter": "none", "bleu": ("ref", "pred")}]},
           "configs": {"a1": {"tag": ["acp_bench", "x"]}, "a2": {"tag": "acp_bench"}, "boolq": {}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_x"]}}
    assert task_items(res, TaskSpec("acp_bench", "Reasoning", "exact_match", kind="tag")) == {"a1": [0, 1], "a2": [1]}
    assert task_items(res, TaskSpec("mmlu", "Reasoning", "acc", kind="group")) == {"mmlu_x": [0.25]}
    assert task_items(res, TaskSpec("boolq", "NLU", "acc", filter="none")) == {"boolq": [1]}
    assert task_items(res, TaskSpec("a1", "NLU", "exact_match", filter="g")) == {"a1": [1]}
    assert task_items(res, TaskSpec("bleu_task", "NLU", "bleu")) == {}  # not a number per document: no items


def test_tokenization_is_kept_across_plans_and_equals_lm_evals(setup, monkeypatch):
    """Every plan asks the same requests: the second LM object tokenizes nothing, gets lm-eval's own token ids, and
    what it gets is its own (mutating it leaves the kept copy alone)."""
    from lm_eval.models.huggingface import HFLM

    from alloc_moe.backends.hf import lm as hf_lm

    model = str(setup / "model")
    pairs = [("the cat eats", " bread ."), ("sort c a b =", " a"), ("7 4 + 1 =", " 8"), ("the cat eats ", "soup .")]
    with hf_lm.make_lm(model, None, batch_size=4, dtype="float32", device="cpu") as first:
        got = [first._encode_pair(c, x) for c, x in pairs]
        plain = HFLM(pretrained=first.model, tokenizer=first.tokenizer, batch_size=4, add_bos_token=first.add_bos_token)
        assert got == [plain._encode_pair(c, x) for c, x in pairs]
        got[0][0].append(-1)
    calls = []
    tok = hf_lm.load_cached(model, "float32", "cpu")[1]
    monkeypatch.setattr(type(tok), "encode", lambda self, *a, **k: calls.append(a) or [])
    with hf_lm.make_lm(model, Plan.load(setup / "tight.json"), batch_size=4, dtype="float32", device="cpu") as second:
        again = [second._encode_pair(c, x) for c, x in pairs]
    assert calls == []
    monkeypatch.undo()
    assert again == [plain._encode_pair(c, x) for c, x in pairs]


def test_lm_evals_environment_report_is_collected_once(monkeypatch):
    import lm_eval.evaluator
    import lm_eval.loggers.utils

    from alloc_moe.stages import accuracy

    calls = []
    monkeypatch.setattr(lm_eval.loggers.utils, "add_env_info", lambda s: calls.append(1) or s.update(pretty_env_info="x"))
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lm_eval.evaluator.add_env_info)  # restored after the test
    accuracy._lm_eval_env_info.cache_clear()
    accuracy._collect_env_info_once()
    stores = [{}, {}, {}]
    for s in stores:
        lm_eval.evaluator.add_env_info(s)
    assert calls == [1] and stores == [{"pretty_env_info": "x"}] * 3
    accuracy._lm_eval_env_info.cache_clear()
