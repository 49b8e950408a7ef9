"""Corpus variants for an NLU group that moves (issue 18, item 2; docs/results/task-suite-v3-exploration.md).

An exploration, not the product: it patches `synthetic.fact` (and, with LANG_WEIGHT=n, the language family's
training weight) in this process only, trains the embedded default's recipe (config/config.yaml's `train`) on that
corpus, and scores the ORIGINAL model (no plan, no method, no budget) on held-out knowledge items. Usage:

    LANG_WEIGHT=2 PYTHONPATH=. .venv/bin/python docs/results/task_suite_v3_explore.py VARIANT SEED P_WORLD OUTDIR THREADS

VARIANT (the corpus's "world": a fixed random table, seed 12345; a fact follows it with probability P_WORLD):
  triple-object: (adjective, noun, verb class) -> object, 384 facts; item 'det adj noun verb' -> the object
  entity-verb:   (adjective, noun) -> verb class, 96 facts; item 'det adj noun' -> the verb
  noun-object:   (noun, verb class) -> object, 48 facts; item 'det [adj] noun verb' -> the object
Items: 800 drawn with seed 777 from the held-out questions (`synthetic.is_heldout`; 332 distinct for noun-object, so
items repeat), scored by argmax over the class's 4 choices (chance 25). noun-object also scores `d1`: the same items,
each after one training statement of the corpus (seed 778), so contexts are distinct. EVAL_ONLY=1 scores the model
already in OUTDIR. Prints one JSON line.
"""

import json
import random
import sys

import torch

from alloc_moe.data import synthetic as S
from alloc_moe.data.train import train
from alloc_moe.data.train_config import TrainConfig

variant, seed, p_world, out, threads = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if variant not in ("triple-object", "entity-verb", "noun-object"):
    sys.exit(f"unknown variant {variant!r}; allowed: triple-object, entity-verb, noun-object")
LEMMA = {**{n: n for n in S.NOUN["sg"]}, **dict(zip(S.NOUN["pl"], S.NOUN["sg"]))}
wr = random.Random(12345)
CLASSES = list(S.VERBS)
ENTITY_VERB = {(a, n): wr.choice(CLASSES) for a in S.ADJ for n in S.NOUN["sg"]}
NOUN_OBJ = {(n, c): wr.choice(S.VERBS[c][2]) for n in S.NOUN["sg"] for c in CLASSES}
w3 = random.Random(12345)  # its own table (round 1 drew it first, from a fresh generator)
TRIPLE_OBJ = {(a, n, c): w3.choice(S.VERBS[c][2]) for a in S.ADJ for n in S.NOUN["sg"] for c in S.VERBS}


def fact_triple(r):
    """Round 1's draw order (the original `fact`'s, then the world)."""
    num = r.choice(["sg", "pl"])
    cls = r.choice(list(S.VERBS))
    sg, pl, objs = S.VERBS[cls]
    det, noun = r.choice(S.DET[num]), r.choice(S.NOUN[num])
    adj = None if r.random() < 0.5 else r.choice(S.ADJ)
    subj = f"{det} {noun}" if adj is None else f"{det} {adj} {noun}"
    obj = TRIPLE_OBJ[(adj, LEMMA[noun], cls)] if adj is not None and r.random() < p_world else r.choice(objs)
    verb = sg if num == "sg" else pl
    return {"num": num, "cls": cls, "subj": subj, "verb": verb, "obj": obj, "question": f"{subj} {verb}",
            "answer": f"{obj} ."}


def fact(r):
    num = r.choice(["sg", "pl"])
    det, noun = r.choice(S.DET[num]), r.choice(S.NOUN[num])
    adj = None if r.random() < 0.5 else r.choice(S.ADJ)
    if variant == "entity-verb" and adj is not None and r.random() < p_world:
        cls = ENTITY_VERB[(adj, LEMMA[noun])]
    else:
        cls = r.choice(CLASSES)
    sg, pl, objs = S.VERBS[cls]
    if variant == "noun-object" and r.random() < p_world:
        obj = NOUN_OBJ[(LEMMA[noun], cls)]
    else:
        obj = r.choice(objs)
    subj = f"{det} {noun}" if adj is None else f"{det} {adj} {noun}"
    verb = sg if num == "sg" else pl
    return {"num": num, "cls": cls, "subj": subj, "verb": verb, "obj": obj, "question": f"{subj} {verb}",
            "answer": f"{obj} ."}


S.fact = fact_triple if variant == "triple-object" else fact
import os

if os.environ.get("LANG_WEIGHT"):
    S.TRAIN_WEIGHTS = {**S.TRAIN_WEIGHTS, "language": int(os.environ["LANG_WEIGHT"])}
torch.set_num_threads(threads)
cfg = TrainConfig(arch="olmoe", width="small", layers=8, steps=900, aux_loss_coef=1e-4, z_loss_coef=0.0,
                  router_lr_mult=1.5, seed=seed)
if os.environ.get("EVAL_ONLY") != "1":  # EVAL_ONLY=1: score the model already in OUTDIR
    train(cfg, out, progress=False, overwrite=True)

from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(out).eval()
r = random.Random(777)
items = []
while len(items) < 800:
    num = r.choice(["sg", "pl"])
    cls = r.choice(CLASSES)
    sg, pl, objs = S.VERBS[cls]
    det, noun, adj = r.choice(S.DET[num]), r.choice(S.NOUN[num]), r.choice(S.ADJ)
    form = 0 if num == "sg" else 1
    if variant == "triple-object":
        q = f"{det} {adj} {noun} {sg if num == 'sg' else pl}"
        if S.is_heldout(q):
            items.append((q, objs, TRIPLE_OBJ[(adj, LEMMA[noun], cls)]))
    elif variant == "entity-verb":
        gold_cls = ENTITY_VERB[(adj, LEMMA[noun])]
        q = f"{det} {adj} {noun} {S.VERBS[gold_cls][form]}"  # the held-out split is by the fact's question
        if S.is_heldout(q):
            items.append((f"{det} {adj} {noun}", [S.VERBS[c][form] for c in CLASSES], S.VERBS[gold_cls][form]))
    else:
        subj = f"{det} {noun}" if r.random() < 0.5 else f"{det} {adj} {noun}"
        q = f"{subj} {S.VERBS[cls][form]}"
        if S.is_heldout(q):
            items.append((q, S.VERBS[cls][2], NOUN_OBJ[(LEMMA[noun], cls)]))


def score(items) -> float:
    right = 0
    with torch.no_grad():
        for q, choices, gold in items:
            ids = torch.tensor([[S.BOS_ID] + [S.VOCAB[w] for w in q.split()]])
            lp = model(ids).logits[0, -1]
            right += max(choices, key=lambda o: float(lp[S.VOCAB[o]])) == gold
    return 100 * right / len(items)


res = {"train_weights": S.TRAIN_WEIGHTS, "variant": variant, "seed": seed, "p_world": p_world,
       "score": score(items), "chance": 25.0, "items": len(items)}
if variant == "noun-object":
    # d1: each item after one training statement of the same corpus (its own draw, seed 778): distinct contexts
    r2 = random.Random(778)
    d1 = []
    for q, choices, gold in items:
        prev = S.draw(fact, r2, "train")
        d1.append((f"{prev['question']} {prev['answer']} {q}", choices, gold))
    res |= {"score_d1": score(d1), "distinct_d1": len({q for q, _, _ in d1}), "distinct": len({q for q, _, _ in items})}
print(json.dumps(res))
