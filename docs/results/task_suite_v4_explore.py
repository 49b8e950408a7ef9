"""A second NLU relation on top of corpus v2 (issue 18, item 2, R2 for NLU; docs/results/task-suite-v3.md).

An exploration, not the product. emb_world's resolution is bounded by its 48 facts; a group's score is the mean of
its tasks, so a second NLU task over facts of its own would add independent clusters. This script patches
`synthetic.fact_v2` in this process only (corpus v2 otherwise unchanged: the noun-object world at P_WORLD 0.8,
language weight 2), trains the embedded default's recipe on it, and scores the ORIGINAL model (no plan, no method,
no budget) on held-out items. Usage:

    PYTHONPATH=. .venv/bin/python -P docs/results/task_suite_v4_explore.py VARIANT SEED P2 OUTDIR THREADS

VARIANT:
  entity-verb: a second fixed random table, (adjective, noun) -> verb class, 96 facts (seed 54321); a statement
               with an adjective follows it with probability P2; item 'det adj noun' -> the verb (4 choices, of the
               subject's number), after one training statement (d1)
  form-object: the world keyed by the noun's word form instead of its lemma: (noun form, verb class) -> object, 96
               facts; the singular forms keep corpus v2's objects, the plural forms get their own (seed 24680);
               a statement follows it with probability P2 (corpus v2: 0.8 for 48 facts). Item: emb_world's form,
               gold from this table, its unit the (noun form, class) fact
Also scored: corpus v2's knowledge item (emb_world's form and gold, 800 items) on the same model. EVAL_ONLY=1 scores
the model already in OUTDIR. Prints one JSON line.
"""

import json
import os
import random
import sys

import torch

from alloc_moe.data import synthetic as S
from alloc_moe.data.tasks import embedded as E
from alloc_moe.data.train import train
from alloc_moe.data.train_config import TrainConfig

variant, seed, p2, out, threads = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if variant not in ("entity-verb", "form-object"):
    sys.exit(f"unknown variant {variant!r}; allowed: entity-verb, form-object")
CLASSES = list(S.VERBS)
wr = random.Random(54321)
ENTITY_VERB = {(a, n): wr.choice(CLASSES) for a in S.ADJ for n in S.NOUN["sg"]}
wf = random.Random(24680)
FORM_OBJECT = {**{(n, c): S.WORLD[(n, c)] for n in S.NOUN["sg"] for c in CLASSES},
               **{(n, c): wf.choice(S.VERBS[c][2]) for n in S.NOUN["pl"] for c in CLASSES}}


def fact_v2_plus(r: random.Random) -> dict:
    """fact_v2's draw order; the verb class follows ENTITY_VERB with probability p2 when the subject has an adjective."""
    num = r.choice(["sg", "pl"])
    det, noun = r.choice(S.DET[num]), r.choice(S.NOUN[num])
    adj = None if r.random() < 0.5 else r.choice(S.ADJ)
    cls = r.choice(CLASSES)
    if variant == "entity-verb" and adj is not None and r.random() < p2:
        cls = ENTITY_VERB[(adj, S.LEMMA[noun])]
    sg, pl, objs = S.VERBS[cls]
    if variant == "form-object":
        obj = FORM_OBJECT[(noun, cls)] if r.random() < p2 else r.choice(objs)
    else:
        obj = S.WORLD[(S.LEMMA[noun], cls)] if r.random() < S.P_WORLD else r.choice(objs)
    subj = f"{det} {noun}" if adj is None else f"{det} {adj} {noun}"
    verb = sg if num == "sg" else pl
    return {"num": num, "cls": cls, "subj": subj, "verb": verb, "obj": obj,
            "question": f"{subj} {verb}", "answer": f"{obj} ."}


S.fact_v2 = fact_v2_plus  # _language_v2 and emb_world's prefix look it up at call time
torch.set_num_threads(threads)
cfg = TrainConfig(arch="olmoe", width="small", layers=8, steps=900, aux_loss_coef=1e-4, z_loss_coef=0.0,
                  router_lr_mult=1.5, seed=seed, corpus="v2")
if os.environ.get("EVAL_ONLY") != "1":
    train(cfg, out, progress=False, overwrite=True)

from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(out).eval()


def entity_items(n: int) -> list:
    r = random.Random(777)
    items = []
    while len(items) < n:
        prev = S.draw(fact_v2_plus, r, "train")
        num = r.choice(["sg", "pl"])
        det, noun, adj = r.choice(S.DET[num]), r.choice(S.NOUN[num]), r.choice(S.ADJ)
        form = 0 if num == "sg" else 1
        gold = ENTITY_VERB[(adj, S.LEMMA[noun])]
        if S.is_heldout(f"{det} {adj} {noun} {S.VERBS[gold][form]}"):
            items.append((f"{prev['question']} {prev['answer']} {det} {adj} {noun}",
                          [S.VERBS[c][form] for c in CLASSES], S.VERBS[gold][form], f"{adj} {S.LEMMA[noun]}"))
    return items


def world_items(n: int) -> list:
    r = random.Random(E.SEED)
    out = []
    for _ in range(n):
        it = E._world(r)
        out.append((it["context"], it["choices"], it["choices"][it["gold"]], E._world_fact(it)))
    return out


def score(items) -> dict:
    right, per = 0, {}
    with torch.no_grad():
        for q, choices, gold, unit in items:
            ids = torch.tensor([[S.BOS_ID] + [S.VOCAB[w] for w in q.split()]])
            lp = model(ids).logits[0, -1]
            ok = max(choices, key=lambda o: float(lp[S.VOCAB[o]])) == gold
            right += ok
            per.setdefault(unit, []).append(ok)
    return {"score": round(100 * right / len(items), 2), "items": len(items), "units": len(per),
            "units_mostly_right": sum(sum(v) / len(v) > 0.5 for v in per.values())}


def form_items(n: int) -> list:
    """emb_world's items (same draw), gold and unit from FORM_OBJECT."""
    r = random.Random(E.SEED)
    out = []
    for _ in range(n):
        it = E._world(r)
        noun, verb = it["context"].split()[-2:]
        cls = next(c for c, (sg, pl, _) in S.VERBS.items() if verb in (sg, pl))
        out.append((it["context"], it["choices"], FORM_OBJECT[(noun, cls)], f"{noun} {cls}"))
    return out


res = {"variant": variant, "seed": seed, "p2": p2, "chance": 25.0, "world": score(world_items(800))}
if variant == "entity-verb":
    res["entity_verb"] = score(entity_items(800))
else:
    res["form_object"] = score(form_items(800))
    res["form_object_2951"] = score(form_items(2951))
print(json.dumps(res), flush=True)
