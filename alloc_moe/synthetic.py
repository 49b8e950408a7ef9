"""A deterministic synthetic text corpus with task families, so the embedded pipeline needs no download.

Families: `language` (a small agreement grammar), `patterns` (copy / reverse / sort of short letter lists),
`arithmetic` (small additions and subtractions). Each document is one line; the split (calibration vs evaluation)
comes from the seed, so two seeds give disjoint draws of the same distribution.
"""

import json
import random

from .io import atomic_write_text

_SUBJ = {"sg": ["the cat", "a dog", "the bird", "my friend", "the teacher"],
         "pl": ["the cats", "two dogs", "the birds", "my friends", "the teachers"]}
_VERB = {"sg": ["sees", "likes", "follows", "finds"], "pl": ["see", "like", "follow", "find"]}
_OBJ = ["the river", "a red ball", "the old house", "some bread", "the green hill"]


def _language(r: random.Random) -> str:
    n = r.choice(["sg", "pl"])
    return f"{r.choice(_SUBJ[n])} {r.choice(_VERB[n])} {r.choice(_OBJ)} ."


def _patterns(r: random.Random) -> str:
    xs = [r.choice("abcdefgh") for _ in range(r.randint(3, 5))]
    op = r.choice(["copy", "reverse", "sort"])
    ys = {"copy": xs, "reverse": xs[::-1], "sort": sorted(xs)}[op]
    return f"{op} {' '.join(xs)} = {' '.join(ys)} ;"


def _arithmetic(r: random.Random) -> str:
    a, b = r.randint(0, 49), r.randint(0, 49)
    if r.random() < 0.5:
        return f"{a} + {b} = {a + b} ;"
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b} ;"


FAMILIES = {"language": _language, "patterns": _patterns, "arithmetic": _arithmetic}


def make_corpus(seed: int, docs_per_family: int, sentences_per_doc: int = 8) -> list[dict]:
    r = random.Random(seed)
    return [{"family": fam, "text": " ".join(gen(r) for _ in range(sentences_per_doc))}
            for fam, gen in FAMILIES.items() for _ in range(docs_per_family)]


def write_corpus(path, seed: int, docs_per_family: int) -> None:
    atomic_write_text(path, "".join(json.dumps(d) + "\n" for d in make_corpus(seed, docs_per_family)))


def register_cli(sub) -> None:
    p = sub.add_parser("make-corpus", help="write a deterministic synthetic .jsonl corpus (language, patterns, arithmetic)",
                       description="Write a deterministic synthetic corpus with three task families as .jsonl.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs-per-family", type=int, default=200)
    p.add_argument("--out", required=True)
    p.set_defaults(func=lambda a: write_corpus(a.out, a.seed, a.docs_per_family) or 0)
