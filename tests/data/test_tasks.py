"""Task suites: the embedded items (held out, unique, well-formed), lm-eval configs, the paper suite by construction,
and group aggregation against hand-computed values."""

import json
import math

import pytest

from alloc_moe.data import synthetic as syn
from alloc_moe.data.tasks import GROUPS, embedded, group_scores, suite


@pytest.mark.parametrize("task", list(embedded.ITEMS))
def test_items_are_held_out_unique_and_well_formed(task):
    items = embedded.make_items(task, 300)
    assert len({it["context"] for it in items}) == 300
    train_questions = {d["question"] for d in (syn.fact(__import__("random").Random(i)) for i in range(2000))
                       if not syn.is_heldout(d["question"])}
    for it in items:
        assert all(w in syn.VOCAB for w in it["context"].split())
        if "choices" in it:
            assert 0 <= it["gold"] < len(it["choices"]) and len(set(it["choices"])) == len(it["choices"])
            assert all(c in syn.VOCAB for c in it["choices"])  # one token each: lm-eval scores the item in one pass
        else:
            assert all(w in syn.VOCAB for w in it["answer"].split())
        # the question the item asks was held out of training text
        if task in ("emb_agreement", "emb_selection"):
            q = " ".join(it["context"].split(" . ", 1)[1].split()[:-1] if task == "emb_agreement" else
                         it["context"].split(" . ", 1)[1].split())
            assert q not in train_questions
    assert embedded.make_items(task, 50) == items[:50]  # deterministic


def test_answers_are_right():
    for it in embedded.make_items("emb_digit", 200):
        expr, _, done = it["context"].partition("=")
        a, op, b = expr.replace(" ", "").partition("+") if "+" in expr else expr.replace(" ", "").partition("-")
        a, b = int(a[::-1]), int(b[::-1])  # numbers are written least significant digit first
        c = a + b if op == "+" else a - b
        assert str(c)[::-1].startswith(done.replace(" ", "") + it["choices"][it["gold"]])
    for it in embedded.make_items("emb_yesno", 200):
        fact, q = it["context"].split(" . question : ")
        assert (fact.split()[-1] == q.split()[-4]) == (it["choices"][it["gold"]] == "yes")
    for it in embedded.make_items("emb_minmax", 100):
        op, *xs = it["context"].split()[:-1]
        assert it["choices"][it["gold"]] == (min(xs) if op == "min" else max(xs))


def test_training_text_never_contains_a_heldout_question():
    docs = syn.make_corpus(0, 30)
    heldout_ctx = {it["context"] for it in embedded.make_items("emb_arith_gen", 400)}
    text = " ".join(d["text"] for d in docs)
    assert not any(f"; {c} " in text for c in heldout_ctx)


def test_write_suite_yaml_is_offline_lm_eval_config(tmp_path):
    import yaml

    paths = embedded.write_suite(tmp_path, items={t: 20 for t in embedded.ITEMS})
    assert [p.stem for p in paths] == list(embedded.ITEMS)
    for p in paths:
        cfg = yaml.safe_load(p.read_text())
        assert cfg["dataset_path"] == "json" and cfg["dataset_kwargs"]["data_files"]["test"] == f"{p.stem}.jsonl"
        assert cfg["metadata"]["group"] in GROUPS
        rows = [json.loads(x) for x in (tmp_path / f"{p.stem}.jsonl").read_text().splitlines()]
        assert len(rows) == 20
        expected = 0.0 if p.stem == "emb_arith_gen" else 100 * sum(1 / len(r["choices"]) for r in rows) / 20
        assert cfg["metadata"]["chance"] == pytest.approx(expected, abs=1e-3)


def test_paper_suite_is_the_papers_20_datasets_in_three_groups():
    s = suite("paper")
    by_group = {g: [t.name for t in s if t.group == g] for g in GROUPS}
    assert len(by_group["NLU"]) == 7 and len(by_group["Reasoning"]) == 11 and len(by_group["Math"]) == 3
    em = {t.name for t in s if t.metric == "exact_match"}
    assert em == {"gsm8k", "acp_bench", "bbh"}  # exact match for these three, accuracy otherwise
    assert all(t.metric == "acc" for t in s if t.name not in em)


def test_paper_suite_names_resolve_in_lm_eval_registry():
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    for t in suite("paper"):
        if t.kind == "group":
            assert t.name in tm.all_groups, t.name
        elif t.kind == "tag":
            assert t.name in tm.all_tags, t.name
        else:
            assert t.name in tm.all_tasks and t.name not in tm.all_groups, t.name


def test_group_scores_hand_computed():
    rows = [{"group": "NLU", "value": 60.0, "stderr": 3.0}, {"group": "NLU", "value": 80.0, "stderr": 4.0},
            {"group": "Math", "value": 10.0, "stderr": 1.0}]
    out = {g["group"]: g for g in group_scores(rows)}
    assert [g["group"] for g in group_scores(rows)] == ["NLU", "Math"]  # the paper's group order
    assert out["NLU"]["value"] == 70.0 and out["NLU"]["stderr"] == pytest.approx(math.sqrt(9 + 16) / 2)
    assert out["Math"]["value"] == 10.0 and out["Math"]["stderr"] == 1.0 and out["NLU"]["n_tasks"] == 2
