"""The `embedded` task suite: multiple-choice (loglikelihood) and generation tasks on held-out synthetic items.

Three groups mirror the paper's (NLU / Reasoning / Math). Every item's question is held out from training and
calibration text (`synthetic.is_heldout`), and items are unique by context. Answers are single tokens, so lm-eval
scores a multiple-choice item with one forward pass (its logits cache for one-token continuations).

| task | group | what is asked | choices | chance (points) |
|---|---|---|---|---|
| emb_agreement | NLU | verb form agreeing with the subject, after an unrelated sentence | 2 | 50 |
| emb_selection | NLU | the object the verb selects, after an unrelated sentence | 4 | 25 |
| emb_yesno | NLU | is a question about the sentence just stated true (BoolQ / RTE counterpart) | 2 | 50 |
| emb_reverse | Reasoning | next letter of a reversed list (teacher-forced) | the list's letters (2-5) | ~32 |
| emb_sort | Reasoning | next letter of a sorted list (teacher-forced) | the list's letters (2-5) | ~32 |
| emb_minmax | Reasoning | the smallest / largest letter of a list | the list's letters (2-5) | ~32 |
| emb_digit | Math | next digit of a sum or difference (teacher-forced) | 4 digits | 25 |
| emb_arith_gen | Math | the whole result, generated greedily, exact match (GSM8K counterpart) | - | ~0 |

Chance is computed from the items (mean of 1 / number of choices) and recorded in each task's YAML metadata.
The design (item kinds, counts, seeds) was fixed from the original model's scores alone, before any method was
evaluated on it; see the README's fidelity section.
"""

import json
import random
from pathlib import Path

from ...errors import AllocMoeError
from ...io import atomic_write_text
from .. import synthetic as syn
from . import TaskSpec

SEED = 20261123
ITEMS = {"emb_agreement": 800, "emb_selection": 800, "emb_yesno": 800, "emb_reverse": 800, "emb_sort": 800,
         "emb_minmax": 800, "emb_digit": 1200, "emb_arith_gen": 1200}


def _agreement(r):
    prefix, f = syn.draw(syn.fact, r, "train"), syn.draw(syn.fact, r, "heldout")
    sg, pl, _ = syn.VERBS[f["cls"]]
    ctx = f"{prefix['question']} {prefix['answer']} {f['subj']}"
    return {"context": ctx, "choices": [sg, pl], "gold": 0 if f["num"] == "sg" else 1}


def _selection(r):
    prefix, f = syn.draw(syn.fact, r, "train"), syn.draw(syn.fact, r, "heldout")
    classes = list(syn.VERBS)
    choices = [f["obj"] if c == f["cls"] else r.choice(syn.VERBS[c][2]) for c in classes]
    return {"context": f"{prefix['question']} {prefix['answer']} {f['question']}", "choices": choices,
            "gold": classes.index(f["cls"])}


def _yesno(r):
    f = syn.draw(syn.yesno, r, "heldout")
    return {"context": f["question"], "choices": ["yes", "no"], "gold": 0 if f["answer"].startswith("yes") else 1}


def _list_position(op):
    def make(r):
        p = syn.draw(lambda rr: syn.pattern(rr, op), r, "heldout")
        j = r.randrange(len(p["ys"]))
        ctx = " ".join([p["question"], *p["ys"][:j]])
        choices = sorted(set(p["xs"]))  # the answer is always one of the list's letters
        return {"context": ctx, "choices": choices, "gold": choices.index(p["ys"][j])}
    return make


def _minmax(r):
    p = syn.draw(lambda rr: syn.pattern(rr, rr.choice(["min", "max"])), r, "heldout")
    choices = sorted(set(p["xs"]))
    return {"context": p["question"], "choices": choices, "gold": choices.index(p["ys"][0])}


def _digit(r):
    a = syn.draw(syn.arithmetic, r, "heldout")
    ds = a["answer"].split()[:-1]  # digits of the result, without ';'
    j = r.randrange(len(ds))
    choices = sorted([ds[j], *r.sample([d for d in syn.DIGITS if d != ds[j]], 3)])
    return {"context": " ".join([a["question"], *ds[:j]]), "choices": choices, "gold": choices.index(ds[j])}


def _arith_gen(r):
    a = syn.draw(syn.arithmetic, r, "heldout")
    return {"context": a["question"], "answer": syn.digits(a["c"])}


_MAKERS = {"emb_agreement": _agreement, "emb_selection": _selection, "emb_yesno": _yesno,
           "emb_reverse": _list_position("reverse"), "emb_sort": _list_position("sort"), "emb_minmax": _minmax,
           "emb_digit": _digit, "emb_arith_gen": _arith_gen}
_GROUP = {"emb_agreement": "NLU", "emb_selection": "NLU", "emb_yesno": "NLU", "emb_reverse": "Reasoning",
          "emb_sort": "Reasoning", "emb_minmax": "Reasoning", "emb_digit": "Math", "emb_arith_gen": "Math"}
SUITE = [TaskSpec(name=n, group=_GROUP[n], metric="exact_match" if n == "emb_arith_gen" else "acc",
                  filter="first-number" if n == "emb_arith_gen" else "none", num_fewshot=0)
         for n in ITEMS]


def chance(items: list[dict]) -> float:
    """Expected score of uniform guessing, in points (0 for generation: a random string is never exact)."""
    return 100.0 * sum(1 / len(it["choices"]) for it in items) / len(items) if "choices" in items[0] else 0.0


def make_items(task: str, n: int, seed: int = SEED) -> list[dict]:
    """`n` items unique by context (drawn until n distinct contexts are found; fails if the space is too small)."""
    r = random.Random(f"{seed}:{task}")
    items, seen = [], set()
    for _ in range(50 * n):
        it = _MAKERS[task](r)
        if it["context"] not in seen:
            seen.add(it["context"])
            items.append(it)
            if len(items) == n:
                return items
    raise AllocMoeError(f"task {task}: only {len(items)} distinct held-out items found, {n} asked for")


def task_config(task: str, data_file: str | Path, chance_points: float = 0.0) -> dict:
    """lm-eval task config for one embedded task reading `data_file` (jsonl, one item per line). Fields are named,
    not templated: lm-eval then reads them directly instead of compiling a jinja template per document (which cost
    more than the model's forward passes)."""
    cfg = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
           "test_split": "test", "doc_to_text": "context", "num_fewshot": 0,
           "metadata": {"version": 1.0, "group": _GROUP[task], "chance": round(chance_points, 4)}}
    if task == "emb_arith_gen":
        cfg.update(output_type="generate_until", doc_to_target="answer",
                   generation_kwargs={"until": [";"], "max_gen_toks": 5, "do_sample": False},
                   filter_list=[{"name": "first-number", "filter": [
                       {"function": "regex", "regex_pattern": r"([0-9](?: [0-9])*)"}, {"function": "take_first"}]}],
                   metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    else:
        cfg.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="gold",
                   metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    return cfg


def write_suite(out_dir: str | Path, *, seed: int = SEED, items: dict | None = None) -> list[Path]:
    """Write each task's items (`<task>.jsonl`) and its lm-eval YAML (`<task>.yaml`, data path relative to it)."""
    import yaml

    out = Path(out_dir)
    counts = {**ITEMS, **(items or {})}
    written = []
    for task in ITEMS:
        rows = make_items(task, counts[task], seed)
        atomic_write_text(out / f"{task}.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
        cfg = task_config(task, f"{task}.jsonl", chance(rows))  # relative: resolved against the YAML's folder when loaded
        atomic_write_text(out / f"{task}.yaml", yaml.safe_dump(cfg, sort_keys=False))
        written.append(out / f"{task}.yaml")
    return written


def register_cli(sub) -> None:
    p = sub.add_parser("make-tasks", help="write the embedded task suite (jsonl + lm-eval YAML) for offline evaluation",
                       description="Write the embedded task suite: held-out synthetic items as jsonl plus lm-eval YAML.")
    p.add_argument("--out", required=True, help="directory to write the tasks into")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--items", type=int, default=None, help="items per task (default: the suite's own counts)")
    p.set_defaults(func=_cmd_make_tasks)


def _cmd_make_tasks(args) -> int:
    if args.items is not None and args.items < 1:
        raise AllocMoeError(f"--items must be >= 1, got {args.items}")
    items = {t: args.items for t in ITEMS} if args.items else None
    paths = write_suite(args.out, seed=args.seed, items=items)
    print(f"wrote {len(paths)} tasks to {args.out}")
    return 0
