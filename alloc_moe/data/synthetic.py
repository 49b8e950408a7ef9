"""Deterministic synthetic corpus for the embedded default: three families that mirror the paper's task groups.

- `language` (NLU-like): sentences with subject-verb agreement and verb-object selection, and yes/no questions
  about a fact stated just before (a BoolQ / RTE counterpart);
- `patterns` (Reasoning-like): copy / reverse / sort / min / max of short letter lists;
- `arithmetic` (Math-like): additions and subtractions of numbers below 100, written digit by digit, least
  significant digit first.

Text is whitespace-tokenized: every word, letter, digit and punctuation mark is one token of the word-level
tokenizer `make_word_tokenizer` (a closed vocabulary, so task answers are single tokens).

Every statement is an *item* with a question part; a hash of the question decides its split (`is_heldout`): one
question in eight is held out. Training and calibration text use only the others, the task suite
(`alloc_moe.data.tasks`) only held-out questions, so no test question is ever seen in training or calibration.

Three calibration sets (`CALIBRATION_SETS`) play the roles of WikiText2 / C4 / Pile in the paper's Table 3: the
balanced mix, a language-heavy mix and a structure-heavy mix, each drawn with its own seed.

The corpus is versioned (`CORPORA`; `CORPUS` is the current one). Every function that draws text takes `corpus=`:
- `v1`: a fact's object is uniform among its verb's four, so the language family has syntax to learn but no knowledge;
  the training stream weighs language 1, patterns 1, arithmetic 2. The embedded task suites v1 and v2 were built on it.
- `v2` (docs/results/task-suite-v3.md): the corpus has a **world**, `WORLD`, a fixed random table (noun, verb class)
  -> object: a fact states the world's object with probability `P_WORLD` = 0.8, otherwise a uniform one; the training
  stream weighs language 2, patterns 1, arithmetic 2. Suite v3's NLU task asks what the world says for held-out
  questions (knowledge, as SciQ asks it). Patterns and arithmetic are drawn exactly as in v1.
"""

import hashlib
import json
import random

from ..errors import AllocMoeError
from ..io import atomic_write_text

# ---- vocabulary -------------------------------------------------------------------------------------------------
DET = {"sg": ["the", "a", "one"], "pl": ["the", "two", "some"]}
NOUN = {"sg": ["cat", "dog", "bird", "friend", "teacher", "farmer", "child", "king", "horse", "sailor", "baker", "queen"],
        "pl": ["cats", "dogs", "birds", "friends", "teachers", "farmers", "children", "kings", "horses", "sailors",
               "bakers", "queens"]}
ADJ = ["big", "small", "old", "young", "red", "brown", "happy", "quiet"]
# verb class -> (singular form, plural/base form, objects it selects)
VERBS = {
    "eat": ("eats", "eat", ["bread", "apples", "soup", "cake"]),
    "read": ("reads", "read", ["books", "letters", "poems", "maps"]),
    "climb": ("climbs", "climb", ["hills", "trees", "walls", "stairs"]),
    "drink": ("drinks", "drink", ["water", "milk", "tea", "juice"]),
}
LETTERS = list("abcdefgh")
DIGITS = [str(d) for d in range(10)]
PATTERN_OPS = ["copy", "reverse", "sort", "min", "max"]
MAX_OPERAND = 99
WORDS = sorted({*DET["sg"], *DET["pl"], *NOUN["sg"], *NOUN["pl"], *ADJ, "does", "do", "question", "answer", "yes", "no",
                *(w for sg, pl, objs in VERBS.values() for w in (sg, pl, *objs)), *LETTERS, *DIGITS, *PATTERN_OPS,
                ".", "?", ":", "=", ";", "+", "-"})
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}

HELDOUT_EVERY = 8


def is_heldout(question: str) -> bool:
    """Deterministic split: a question is held out when its sha256 falls in one bucket of HELDOUT_EVERY."""
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big") % HELDOUT_EVERY == 0


# ---- items: (question, answer) pairs; the text is f"{question} {answer}" --------------------------------------
def fact(r: random.Random) -> dict:
    """An agreement + selection sentence, e.g. 'the cats eat bread .'"""
    num = r.choice(["sg", "pl"])
    cls = r.choice(list(VERBS))
    sg, pl, objs = VERBS[cls]
    det, noun, obj = r.choice(DET[num]), r.choice(NOUN[num]), r.choice(objs)
    subj = f"{det} {noun}" if r.random() < 0.5 else f"{det} {r.choice(ADJ)} {noun}"
    verb = sg if num == "sg" else pl
    return {"num": num, "cls": cls, "subj": subj, "verb": verb, "obj": obj,
            "question": f"{subj} {verb}", "answer": f"{obj} ."}


# ---- corpus v2's world: (noun lemma, verb class) -> the object the world says -----------------------------------
P_WORLD = 0.8
LEMMA = {**{n: n for n in NOUN["sg"]}, **dict(zip(NOUN["pl"], NOUN["sg"]))}  # plural or singular noun -> singular


def _world_table() -> dict[tuple[str, str], str]:
    """48 facts, drawn with seed 12345 after 96 draws of a verb class: the table the exploration's models learned
    (docs/results/task-suite-v3-exploration.md, whose generator drew another table, entity -> verb class, first)."""
    r = random.Random(12345)
    for _ in range(len(ADJ) * len(NOUN["sg"])):
        r.choice(list(VERBS))
    return {(n, c): r.choice(VERBS[c][2]) for n in NOUN["sg"] for c in VERBS}


WORLD = _world_table()


def _fact_of_world(r: random.Random, world: dict, p: float, key=LEMMA.get) -> dict:
    """A fact as `fact` draws it, but its object is `world[key(noun), class]` with probability `p`."""
    num = r.choice(["sg", "pl"])
    det, noun = r.choice(DET[num]), r.choice(NOUN[num])
    adj = None if r.random() < 0.5 else r.choice(ADJ)
    cls = r.choice(list(VERBS))
    sg, pl, objs = VERBS[cls]
    obj = world[(key(noun), cls)] if r.random() < p else r.choice(objs)
    subj = f"{det} {noun}" if adj is None else f"{det} {adj} {noun}"
    verb = sg if num == "sg" else pl
    return {"num": num, "cls": cls, "subj": subj, "verb": verb, "obj": obj,
            "question": f"{subj} {verb}", "answer": f"{obj} ."}


def fact_v2(r: random.Random) -> dict:
    """Corpus v2's fact: as `fact`, but the object is the world's (`WORLD[noun, class]`) with probability P_WORLD."""
    return _fact_of_world(r, WORLD, P_WORLD)


# ---- corpus v3's world: keyed by the noun's word form, (noun form, verb class) -> object: 96 facts -----------------
P_WORLD_V3 = 0.7


def _world_forms_table() -> dict[tuple[str, str], str]:
    """96 facts: the singular forms keep corpus v2's objects (`WORLD`), the plural forms get their own, drawn with seed
    24680 (docs/results/task-suite-v4-exploration.md: singular and plural nouns are different tokens, so the model
    learns them as separate facts anyway; keyed by form, their objects are independent)."""
    r = random.Random(24680)
    return {**{(n, c): WORLD[(n, c)] for n in NOUN["sg"] for c in VERBS},
            **{(n, c): r.choice(VERBS[c][2]) for n in NOUN["pl"] for c in VERBS}}


WORLD_V3 = _world_forms_table()


def fact_v3(r: random.Random) -> dict:
    """Corpus v3's fact: `fact_v2`'s draws, the object `WORLD_V3[noun as written, class]` with probability P_WORLD_V3."""
    return _fact_of_world(r, WORLD_V3, P_WORLD_V3, key=str)


def yesno(r: random.Random, fact_gen=fact) -> dict:
    """A fact, then a yes/no question about it: the object asked about is the stated one or another of its class."""
    f = fact_gen(r)
    sg, pl, objs = VERBS[f["cls"]]
    asked = f["obj"] if r.random() < 0.5 else r.choice([o for o in objs if o != f["obj"]])
    aux = "does" if f["num"] == "sg" else "do"
    q = f"{f['question']} {f['obj']} . question : {aux} {f['subj']} {pl} {asked} ? answer :"
    return {**f, "asked": asked, "question": q, "answer": ("yes" if asked == f["obj"] else "no") + " ."}


def pattern(r: random.Random, op: str | None = None) -> dict:
    xs = [r.choice(LETTERS) for _ in range(r.randint(3, 5))]
    op = op or r.choice(PATTERN_OPS)
    ys = {"copy": xs, "reverse": xs[::-1], "sort": sorted(xs), "min": [min(xs)], "max": [max(xs)]}[op]
    return {"op": op, "xs": xs, "ys": ys, "question": f"{op} {' '.join(xs)} =", "answer": f"{' '.join(ys)} ;"}


def digits(n: int) -> str:
    """A number as digit tokens, least significant first (47 -> '7 4'): carries then flow in reading order, which
    a small model learns within the training budget (most-significant-first was not learned in 600 steps)."""
    return " ".join(reversed(str(n)))


def arithmetic(r: random.Random, op: str | None = None) -> dict:
    a, b = r.randint(0, MAX_OPERAND), r.randint(0, MAX_OPERAND)
    op = op or r.choice("+-")
    if op == "-":
        a, b = max(a, b), min(a, b)
    c = a + b if op == "+" else a - b
    return {"op": op, "a": a, "b": b, "c": c, "question": f"{digits(a)} {op} {digits(b)} =",
            "answer": f"{digits(c)} ;"}


def _language(r):
    return fact(r) if r.random() < 0.75 else yesno(r)


def _language_v2(r):
    return fact_v2(r) if r.random() < 0.75 else yesno(r, fact_v2)


def _language_v3(r):
    return fact_v3(r) if r.random() < 0.75 else yesno(r, fact_v3)


FAMILIES = {"language": _language, "patterns": pattern, "arithmetic": arithmetic}  # corpus v1's

# documents per family in the training stream: arithmetic, the hardest family, gets twice the share
TRAIN_WEIGHTS = {"language": 1, "patterns": 1, "arithmetic": 2}  # corpus v1's

# corpus version -> (families: name -> item generator, training-stream weights). v2 doubles the language family's
# share: with v1's share, one training seed of three did not learn the world at all in 900 steps (the exploration's
# round 3), with twice the share all three did, and Reasoning and Math kept their scores (round 4).
CORPORA = {
    "v1": (FAMILIES, TRAIN_WEIGHTS),
    "v2": ({"language": _language_v2, "patterns": pattern, "arithmetic": arithmetic},
           {"language": 2, "patterns": 1, "arithmetic": 2}),
    # v3: v2 with the world keyed by the noun's word form (96 facts, `WORLD_V3`) at strength 0.7
    # (docs/results/task-suite-v4-exploration.md): the suite v4's NLU task asks about it
    "v3": ({"language": _language_v3, "patterns": pattern, "arithmetic": arithmetic},
           {"language": 2, "patterns": 1, "arithmetic": 2}),
}
CORPUS = "v3"  # the current version: `alloc-moe train`'s and `make-corpus`'s default, the workflow's `corpus:` default


def corpus_spec(corpus: str) -> tuple[dict, dict]:
    """(families, training weights) of a corpus version; one-line error naming the versions."""
    if corpus not in CORPORA:
        raise AllocMoeError(f"unknown corpus {corpus!r}; allowed: {', '.join(CORPORA)}")
    return CORPORA[corpus]

# name -> (seed offset, family weights): the embedded analogues of WikiText2 / C4 / Pile (paper Table 3)
CALIBRATION_SETS = {
    "balanced": (101, {"language": 1, "patterns": 1, "arithmetic": 1}),
    "language": (202, {"language": 4, "patterns": 1, "arithmetic": 1}),
    "structured": (303, {"language": 1, "patterns": 2, "arithmetic": 2}),
}


def draw(gen, r: random.Random, split: str) -> dict:
    """Draw items from `gen` until one falls in `split` ('train' or 'heldout')."""
    want = split == "heldout"
    while True:
        item = gen(r)
        if is_heldout(item["question"]) == want:
            return item


def make_corpus(seed: int, docs_per_family: int, *, sentences_per_doc: int = 8, weights: dict | None = None,
                split: str = "train", corpus: str = CORPUS) -> list[dict]:
    """Documents of `sentences_per_doc` items each, `docs_per_family` x weight documents per family, from corpus
    version `corpus`.

    `split='train'` uses only non-held-out questions (training and calibration text); 'heldout' only held-out ones.
    """
    if split not in ("train", "heldout"):
        raise AllocMoeError(f"unknown split {split!r}; allowed: train, heldout")
    families, _ = corpus_spec(corpus)
    weights = weights or {f: 1 for f in families}
    r = random.Random(seed)
    docs = []
    for fam, gen in families.items():
        for _ in range(docs_per_family * weights.get(fam, 0)):
            items = [draw(gen, r, split) for _ in range(sentences_per_doc)]
            docs.append({"family": fam, "text": " ".join(f"{it['question']} {it['answer']}" for it in items)})
    return docs


def calibration_set(name: str, docs_per_family: int, corpus: str = CORPUS) -> list[dict]:
    if name not in CALIBRATION_SETS:
        raise AllocMoeError(f"unknown calibration set {name!r}; allowed: {', '.join(CALIBRATION_SETS)}")
    seed, weights = CALIBRATION_SETS[name]
    return make_corpus(seed, docs_per_family, weights=weights, corpus=corpus)


def write_jsonl(path, docs: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(d) + "\n" for d in docs))


def make_word_tokenizer():
    """Word-level tokenizer over the closed vocabulary; adds <s> in front of every encoded text.

    Saved with the trained model, it loads with `AutoTokenizer.from_pretrained(dir)`; decoding joins tokens with
    spaces, which round-trips the corpus text exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word tokens with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False,
                                   model_max_length=2048)


def register_cli(sub) -> None:
    p = sub.add_parser("make-corpus", help="write a deterministic synthetic .jsonl corpus (language, patterns, arithmetic)",
                       description="Write a deterministic synthetic corpus with three task families as .jsonl "
                                   "(training split: no held-out question appears).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seed", type=int, default=0, help="draw a balanced corpus with this seed")
    g.add_argument("--calibration-set", choices=list(CALIBRATION_SETS),
                   help="one of the three calibration mixes (fixed seed each; training split)")
    p.add_argument("--docs-per-family", type=int, default=200)
    p.add_argument("--split", choices=["train", "heldout"], default="train",
                   help="train: no held-out question (training/calibration text); heldout: only held-out questions")
    p.add_argument("--corpus", choices=list(CORPORA), default=CORPUS,
                   help=f"corpus version (default {CORPUS}, the current one; v1: no world, see this module's docstring)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_make_corpus)


def _cmd_make_corpus(args) -> int:
    if args.docs_per_family < 1:
        raise AllocMoeError(f"--docs-per-family must be >= 1, got {args.docs_per_family}")
    if args.calibration_set:
        docs = calibration_set(args.calibration_set, args.docs_per_family, args.corpus)
    else:
        docs = make_corpus(args.seed, args.docs_per_family, split=args.split, corpus=args.corpus)
    write_jsonl(args.out, docs)
    print(f"wrote {args.out}: {len(docs)} documents")
    return 0
