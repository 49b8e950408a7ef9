"""The paper's 20 evaluation datasets (section 4.1) as lm-eval 0.4.13 tasks. They need the hub's datasets.

Every choice the paper leaves open is made here, in one place:

| paper name | lm-eval name | kind | metric (filter) | few-shot |
|---|---|---|---|---|
| BoolQ | boolq | task | acc | 0 |
| LAMBADA | lambada_openai | task | acc (the OpenAI variant; `lambada` is a tag of two variants) | 0 |
| RACE | race | task | acc | 0 |
| SciQ | sciq | task | acc | 0 |
| MNLI | mnli | task | acc | 0 |
| QNLI | qnli | task | acc | 0 |
| RTE | rte | task | acc | 0 |
| ARC-E | arc_easy | task | acc | 0 |
| ARC-C | arc_challenge | task | acc | 0 |
| HellaSwag | hellaswag | task | acc | 0 |
| LogiQA | logiqa | task | acc | 0 |
| MMLU | mmlu | group | acc (lm-eval's size-weighted group aggregate) | 0 |
| PIQA | piqa | task | acc | 0 |
| TruthfulQA | truthfulqa_mc2 | task | acc (MC2; `truthfulqa` is a tag with mc1/mc2/gen) | 0 |
| ACP | acp_bench | tag | exact_match (each member's own answer filter), unweighted mean of its 14 tasks | 2 (its default) |
| BBH | bbh | group | exact_match (get-answer), CoT few-shot variant (`bbh` = `bbh_cot_fewshot`) | 3 (its default) |
| GroundCocoa | groundcocoa | task | acc (streams its data: network only) | 0 |
| SWAG | swag | task | acc | 0 |
| GSM8K | gsm8k | task | exact_match (strict-match) | 5 (its default) |
| ASDiv | asdiv | task | acc (loglikelihood variant) | 0 |
| MathQA | mathqa | task | acc | 0 |

`acc`, not `acc_norm`, everywhere the paper says accuracy. Group score = mean of the group's task scores.
"""

from . import TaskSpec

_NLU = ["boolq", "lambada_openai", "race", "sciq", "mnli", "qnli", "rte"]
_REASONING = ["arc_easy", "arc_challenge", "hellaswag", "logiqa", "mmlu", "piqa", "truthfulqa_mc2", "acp_bench", "bbh",
              "groundcocoa", "swag"]
_MATH = ["gsm8k", "asdiv", "mathqa"]

_SPECIAL = {
    "mmlu": dict(kind="group"),
    "acp_bench": dict(metric="exact_match", kind="tag", num_fewshot=None),
    "bbh": dict(metric="exact_match", filter="get-answer", kind="group", num_fewshot=None),
    "gsm8k": dict(metric="exact_match", filter="strict-match", num_fewshot=None),
}


def _spec(name: str, group: str) -> TaskSpec:
    kw = dict(metric="acc", filter="none", num_fewshot=0)
    kw.update(_SPECIAL.get(name, {}))
    return TaskSpec(name=name, group=group, **kw)


SUITE = [_spec(n, "NLU") for n in _NLU] + [_spec(n, "Reasoning") for n in _REASONING] + [_spec(n, "Math") for n in _MATH]
