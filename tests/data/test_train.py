"""`alloc-moe train`: determinism, resume after a kill, loadable output, router summary, bad input."""

import dataclasses
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alloc_moe.cli import main
from alloc_moe.data import synthetic
from alloc_moe.data.train import TrainConfig, deterministic_kernels, router_losses, train
from alloc_moe.errors import AllocMoeError

FAST = TrainConfig(arch="deepseek_v2", width="tiny", layers=3, steps=6, batch_size=4, seq_len=16, warmup=2,
                   checkpoint_every=2)


def _weights(d):
    m = AutoModelForCausalLM.from_pretrained(d)
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("train") / "m"
    summary = train(FAST, out, progress=False)
    return out, summary


def test_output_loads_with_auto_classes_and_tokenizer_round_trips(trained):
    out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "deepseek_v2" and model.config.vocab_size == len(synthetic.VOCAB)
    text = "some happy kings climb hills . 4 7 + 1 2 = 5 9 ;"
    ids = tok(text)["input_ids"]
    assert ids[0] == synthetic.BOS_ID and synthetic.UNK_ID not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    meta = json.loads((out / "alloc_moe_train.json").read_text())
    assert meta["config"]["steps"] == 6 and len(meta["routing"]) == 2  # 3 layers, the first dense
    for r in meta["routing"]:
        assert 0 < r["top1_prob"] <= 1 and 0 <= r["norm_entropy"] <= 1 and 1 <= r["max_load"] <= 8  # tiny: 8 experts
    assert set(meta["heldout_loss"]) == set(synthetic.FAMILIES)
    assert not out.with_name(out.name + ".ckpt.pt").exists()  # the checkpoint is removed once the model is written


def test_same_seed_same_weights_other_seed_differs(trained, tmp_path):
    out, _ = trained
    train(FAST, tmp_path / "again", progress=False)
    a, b = _weights(out), _weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(TrainConfig(**{**FAST.__dict__, "seed": 1}), tmp_path / "other", progress=False)
    c = _weights(tmp_path / "other")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_after_kill_is_identical_to_one_run(trained, tmp_path):
    out, _ = trained
    dst = tmp_path / "m"
    assert train(FAST, dst, progress=False, stop_after=3) is None  # "killed" after step 3, checkpoint on disk
    ckpt = dst.with_name("m.ckpt.pt")
    assert ckpt.exists() and not dst.exists()
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    train(FAST, dst, progress=False)  # resumes at step 3
    a, b = _weights(out), _weights(dst)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path):
    dst = tmp_path / "m"
    train(FAST, dst, progress=False, stop_after=2)
    with pytest.raises(AllocMoeError, match="other training settings"):
        train(TrainConfig(**{**FAST.__dict__, "lr": 1e-4}), dst, progress=False)


def test_router_losses_hand_computed():
    # two tokens, two experts, k=1: both tokens pick expert 0 -> f = [1, 0]; P = mean probs
    logits = torch.log(torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    aux, z = router_losses([logits], k=1)
    assert aux.item() == pytest.approx(2 * (1.0 * 0.75 + 0.0 * 0.25))
    assert z.item() == pytest.approx(0.0, abs=1e-6)  # logsumexp of log-probabilities is 0
    balanced = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    assert router_losses([balanced], k=1)[0].item() == pytest.approx(1.0)  # the minimum, perfectly balanced


def test_router_lr_mult_scales_only_the_router_update(tmp_path):
    """One AdamW step: the routers move exactly `router_lr_mult` times as far, every other weight the same."""
    from alloc_moe.data.train import build_model

    torch.set_num_threads(1)
    init = {k: v.clone() for k, v in build_model(FAST).state_dict().items()}
    moved = {}
    for mult in (1.0, 5.0):
        cfg = dataclasses.replace(FAST, router_lr_mult=mult)
        train(cfg, tmp_path / f"m{mult}", progress=False, stop_after=1)
        state = torch.load(tmp_path / f"m{mult}.ckpt.pt", weights_only=False)["model"]
        moved[mult] = {k: state[k] - init[k] for k in init}
    routers = [k for k in init if k.endswith("mlp.gate.weight")]
    assert len(routers) == 2  # 3 layers, the first dense
    for k in init:
        if k in routers:
            torch.testing.assert_close(moved[5.0][k], 5 * moved[1.0][k], rtol=1e-4, atol=1e-7)
            assert moved[1.0][k].abs().max() > 0
        else:
            assert torch.equal(moved[5.0][k], moved[1.0][k]), k


@pytest.mark.parametrize("argv, msg", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--lr", "-1"], "lr must be"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--router-lr-mult", "0"], "router_lr_mult must be a finite number > 0"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, msg):
    assert main(["train", "--out", str(tmp_path / "m"), *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_corpus_version_is_a_training_setting(tmp_path, capsys):
    """`corpus` picks the synthetic corpus (v3 by default: the world keyed by word form); an unknown one is one line, before any work."""
    from alloc_moe.data import synthetic
    from alloc_moe.data.train import token_stream

    with pytest.raises(AllocMoeError, match="^unknown corpus 'v9'; allowed: v1, v2, v3$"):
        TrainConfig(corpus="v9").check()
    small = dict(steps=4, batch_size=2, seq_len=16)
    v1, v2 = token_stream(TrainConfig(corpus="v1", **small)), token_stream(TrainConfig(**small))
    assert TrainConfig().corpus == synthetic.CORPUS == "v3" and not torch.equal(v1, v2)
    # v1's stream is the one the corpus drew before versions: its first document, packed after <s>
    doc = synthetic.make_corpus(0, 200, weights={"language": 1, "patterns": 1, "arithmetic": 2}, corpus="v1")
    order = torch.randperm(len(doc), generator=torch.Generator().manual_seed(0)).tolist()
    first = [synthetic.BOS_ID] + [synthetic.VOCAB[w] for w in doc[order[0]]["text"].split()]
    assert v1.flatten()[:len(first)].tolist() == first[:v1.numel()]
    assert main(["make-corpus", "--corpus", "v1", "--docs-per-family", "1", "--out", str(tmp_path / "c.jsonl")]) == 0
    assert main(["train", "--out", str(tmp_path / "m"), "--corpus", "v9"]) == 2
    err = capsys.readouterr().err
    assert "unknown corpus 'v9'; allowed: v1, v2, v3" in err and err.count("\n") == 1 and not (tmp_path / "m").exists()


def test_existing_output_needs_overwrite(trained, capsys):
    out, _ = trained
    assert main(["train", "--out", str(out), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU threads")
def test_gather_backward_is_reproducible_under_deterministic_kernels():
    """The hazard `deterministic_kernels` removes, at the op: 2-thread backward of a gather with repeated indices (as
    the MoE blocks' `hidden[token_idx]`) gives one gradient in 30 repeats with it. Without it the default kernel's
    thread-dependent accumulation gave 3-8 different gradients in 20 repeats here (skipped if it gives one: the
    hazard did not show on this machine, and the assertion above still holds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(1024, 128, generator=g, requires_grad=True)  # [T, H]
        idx = torch.randint(0, 1024, (4096,), generator=g)  # [N] token of each (token, expert) pair, repeated
        grad_out = torch.randn(4096, 128, generator=g)  # [N, H]

        def distinct_grads(n: int) -> int:
            grads = set()
            for _ in range(n):
                hidden.grad = None
                hidden[idx].backward(grad_out)
                grads.add(hidden.grad.numpy().tobytes())
            return len(grads)

        with deterministic_kernels():
            assert distinct_grads(30) == 1
        without = distinct_grads(30)
    finally:
        torch.set_num_threads(threads)
    if without == 1:
        pytest.skip("the default kernel's thread-dependent accumulation did not show in 30 repeats here")


@pytest.mark.slow  # two 40-step trainings at the default width on 2 threads: 349 s on 2 shared cores with OpenMP's
# default (spinning) wait policy, ~6x less with OMP_WAIT_POLICY=PASSIVE (tests/conftest.py)
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU threads")
def test_two_thread_training_is_reproducible(tmp_path):
    """At the default width, 2-thread runs used to diverge within 40 steps (the MoE gather's backward accumulated in
    thread-dependent order); two runs must now give identical weights."""
    cfg = TrainConfig(steps=40, checkpoint_every=40)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = []
        for run in ("a", "b"):
            train(cfg, tmp_path / run, progress=False, stop_after=39)
            states.append(torch.load(tmp_path / f"{run}.ckpt.pt", weights_only=False)["model"])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
