"""Layer sensitivity profiling (`alloc_moe.stages.profile`): Algorithm 1 against an independent reference, prefix reuse,
checkpoint/resume, LExI, and the `profile` / `plan` CLI end to end on tiny offline models."""

import json
import random

import numpy as np
import pytest
import torch

from alloc_moe import AllocMoeError, Plan, apply
from alloc_moe.backends.hf.apply import moe_layers
from alloc_moe.backends.hf.loading import load_model
from alloc_moe.backends.hf.perplexity import perplexity
from alloc_moe.cli import main
from alloc_moe.core.sensitivity import read_sensitivity
from alloc_moe.data import zoo
from alloc_moe.data.text import Windows, load_calibration, tokenize_windows
from alloc_moe.stages import profile as profiling
from alloc_moe.stages.profile import profile_lexi, profile_perplexity


def build(arch, *, k=None, layers=None, router_std=1.0, seed=0):
    """Tiny zoo model with peaked routers, optionally with another top-k."""
    overrides = {"num_experts_per_tok": k} if k is not None else None
    return zoo.make_model(arch, layers=layers, router_std=router_std, seed=seed, overrides=overrides)


def windows(n=6, seq=16, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def top_ks(model):
    return [m.gate.top_k for m in moe_layers(model)]


# ------------------------------------------------------------------------------ 1. prefix reuse == naive


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2", "qwen2_moe", "mixtral"])
def test_prefix_reuse_equals_naive(arch):
    model = build(arch)
    ids = windows(5, 16)  # batch_size 2: the last batch is partial
    la, fast = profile_perplexity(model, ids, batch_size=2, prefix_reuse=True, progress=False)
    lb, slow = profile_perplexity(model, ids, batch_size=2, prefix_reuse=False, progress=False)
    L = len(moe_layers(model))
    assert la == lb == [m.index for m in moe_layers(model)]
    assert fast.shape == slow.shape == (L, 2)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=0)
    assert np.isfinite(fast).all() and (fast > 1).all()
    assert top_ks(model) == [2] * L  # restored
    if arch == "deepseek_v2":
        assert la == [1, 2, 3]


# ------------------------------------------------------------- 2. Algorithm 1 against an independent reference


def _reference_S(model, ids, batch_size):
    """S[i, k] by setting the routers by hand and measuring perplexity (layers < i at K, i at k, > i at 1)."""
    layers = moe_layers(model)
    L, K = len(layers), layers[0].k_orig
    win = Windows(ids, ["ref"] * ids.shape[0])

    def ppl(ks):
        for m, k in zip(layers, ks):
            m.gate.top_k = k
        try:
            return perplexity(model, win, batch_size=batch_size, progress=False).ppl
        finally:
            for m in layers:
                m.gate.top_k = K

    S = np.empty((L, K))
    for i in range(L):
        for k in range(1, K):
            S[i, k - 1] = ppl([K] * i + [k] + [1] * (L - i - 1))
        S[i, K - 1] = ppl([K] * (i + 1) + [1] * (L - i - 1))  # layers <= i at K_orig, later ones at 1
    return S, ppl([K] * L)


@pytest.mark.parametrize("arch,k,layers", [("olmoe", 3, 3), ("deepseek_v2", 3, 4), ("qwen2_moe", 2, 3)])
def test_algorithm1_matches_hand_reference(arch, k, layers):
    model = build(arch, k=k, layers=layers)
    assert len(moe_layers(model)) == 3 and moe_layers(model)[0].k_orig == k
    ids = windows(4, 16, seed=1)
    ref, original = _reference_S(model, ids, batch_size=2)
    for reuse in (False, True):
        _, S = profile_perplexity(model, ids, batch_size=2, prefix_reuse=reuse, progress=False)
        np.testing.assert_allclose(S, ref, rtol=1e-5 if reuse else 1e-9, atol=0)
    assert S[-1, -1] == pytest.approx(original, rel=1e-5)
    # the table is not degenerate: reducing a layer to one expert hurts somewhere
    assert not np.allclose(ref[:, 0], ref[:, -1])
    # S[i, K] is the configuration before layer i is reduced = S[i+1, 1]
    np.testing.assert_allclose(S[:-1, -1], S[1:, 0], rtol=0, atol=0)


def test_profile_perplexity_rejects_mixed_k_orig():
    model = build("olmoe")
    moe_layers(model)[1].gate.top_k = 1
    with pytest.raises(AllocMoeError, match="same K_orig"):
        profile_perplexity(model, windows(2, 8), progress=False)


# ------------------------------------------------------------------------------------ 3. checkpoint / resume


@pytest.fixture(scope="module")
def olmoe_k3():
    return build("olmoe", k=3)


def _dying(real, after):
    """Wrap a row generator so the run is "killed" (KeyboardInterrupt) once `after` rows are finished."""
    def rows(*args, **kwargs):
        for n, row in enumerate(real(*args, **kwargs)):
            if n == after:
                raise KeyboardInterrupt
            yield row
    return rows


@pytest.mark.parametrize("reuse", [True, False], ids=["prefix-reuse", "naive"])
def test_checkpoint_resume_equals_uninterrupted(olmoe_k3, tmp_path, monkeypatch, reuse):
    model = olmoe_k3
    ids = windows(4, 12, seed=2)
    n_tok = 4 * 11
    gen_name = "_suffix_rows" if reuse else "_naive_rows"
    real = getattr(profiling, gen_name)
    _, full = profile_perplexity(model, ids, batch_size=2, prefix_reuse=reuse, progress=False)

    ckpt = tmp_path / "S.csv.ckpt.json"
    fp = {"model": "tiny", "seq_len": 12}
    monkeypatch.setattr(profiling, gen_name, _dying(real, 2))
    with pytest.raises(KeyboardInterrupt):
        profile_perplexity(model, ids, batch_size=2, prefix_reuse=reuse, checkpoint=ckpt, fingerprint=fp,
                           progress=False)
    assert top_ks(model) == [3] * 4  # routers restored after the interrupt
    data = json.loads(ckpt.read_text())
    assert data["fingerprint"] == fp and sorted(data["rows"]) == ["0", "1"]
    for i in (0, 1):  # NLL sums of the finished rows (k = 1..K-1)
        np.testing.assert_allclose(np.exp(np.array(data["rows"][str(i)]) / n_tok), full[i, :2], rtol=1e-12)

    # another run's checkpoint is refused, and left alone
    monkeypatch.setattr(profiling, gen_name, real)
    with pytest.raises(AllocMoeError, match="different profiling run"):
        profile_perplexity(model, ids, batch_size=2, prefix_reuse=reuse, checkpoint=ckpt,
                           fingerprint={**fp, "seq_len": 13}, progress=False)
    assert ckpt.exists()

    # resume: only the missing rows run, the result equals the uninterrupted one, the checkpoint is deleted
    todo_seen = []

    def recording(*args):  # both row generators take (..., todo, bar) last
        todo_seen.append(list(args[-2]))
        return real(*args)

    monkeypatch.setattr(profiling, gen_name, recording)
    layers, resumed = profile_perplexity(model, ids, batch_size=2, prefix_reuse=reuse, checkpoint=ckpt,
                                         fingerprint=fp, progress=False)
    assert todo_seen == [[2, 3]]
    assert layers == [0, 1, 2, 3]
    np.testing.assert_allclose(resumed, full, rtol=1e-12, atol=0)
    assert not ckpt.exists()
    assert list(tmp_path.iterdir()) == []  # no temp files left next to it


def test_checkpoint_every_row_done_runs_no_rows(olmoe_k3, tmp_path, monkeypatch):
    """A checkpoint holding all rows (killed before the final write) only needs the original model's pass."""
    model = olmoe_k3
    ids = windows(2, 10, seed=4)
    ckpt = tmp_path / "c.json"
    _, full = profile_perplexity(model, ids, batch_size=2, progress=False)
    real = profiling._suffix_rows

    def run_then_die(*args, **kwargs):
        yield from real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(profiling, "_suffix_rows", run_then_die)
    with pytest.raises(KeyboardInterrupt):
        profile_perplexity(model, ids, batch_size=2, checkpoint=ckpt, fingerprint={"a": 1}, progress=False)
    assert sorted(json.loads(ckpt.read_text())["rows"]) == ["0", "1", "2", "3"]
    monkeypatch.setattr(profiling, "_suffix_rows", real)
    _, resumed = profile_perplexity(model, ids, batch_size=2, checkpoint=ckpt, fingerprint={"a": 1}, progress=False)
    np.testing.assert_allclose(resumed, full, rtol=1e-12, atol=0)
    assert not ckpt.exists()


# -------------------------------------------------------------------------------------------------- 4. LExI


def test_lexi_shape_zero_last_column_monotone_deterministic():
    model = build("olmoe", k=4)
    layers, S = profile_lexi(model, tokens=64, draws=2, seed=0, progress=False)
    assert layers == [0, 1, 2, 3] and S.shape == (4, 4)
    assert (S[:, -1] == 0).all()
    assert (S[:, :-1] > 0).all() and np.isfinite(S).all()
    means = S.mean(axis=0)
    assert (np.diff(means) <= 0).all(), means  # fewer experts -> larger deviation, on average
    assert (np.diff(S, axis=1) <= 1e-6 * S.max()).mean() >= 0.75
    assert top_ks(model) == [4] * 4
    _, again = profile_lexi(model, tokens=64, draws=2, seed=0, progress=False)
    assert np.array_equal(S, again)
    _, other = profile_lexi(model, tokens=64, draws=2, seed=1, progress=False)
    assert not np.array_equal(S, other)


def test_lexi_cell_by_hand_with_dense_layer_and_shared_expert():
    """One LExI cell recomputed: mean over draws of ||block_k(x) - block_K(x)||_F, x = post-attention norm of noise
    (decoder layer 0 of this DeepSeek model is dense and is skipped)."""
    model = build("deepseek_v2", k=3)
    layers, S = profile_lexi(model, tokens=32, draws=3, seed=5, progress=False)
    assert layers == [1, 2, 3] and S.shape == (3, 3)
    m = moe_layers(model)[1]
    dec = model.model.layers[m.index]
    g = torch.Generator().manual_seed(5 * 100003 + m.index)
    total = 0.0
    with torch.no_grad():
        for _ in range(3):
            x = dec.post_attention_layernorm(torch.randn(1, 32, model.config.hidden_size, generator=g))
            m.gate.top_k = 3
            ref = m.block(x)
            m.gate.top_k = 1
            total += float(torch.linalg.norm(m.block(x) - ref)) / 3
            m.gate.top_k = 3
    assert S[1, 0] == pytest.approx(total, rel=1e-6)


# ---------------------------------------------------------------------------------------------- 5. CLI


def _calibration_text(n_chars=6000, seed=0):
    rng = random.Random(seed)
    words = ("the model routes each token to a few experts while budget allocation keeps quality high across "
             "layers Paris 1889 quartz sphinx judge vow zebra quickly !? , ; : ( ) 42 3.14 naive café déjà").split()
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        out.append(sentence.capitalize() + rng.choice([".", "!", "?", "\n"]))
    return " ".join(out)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "olmoe"
    assert main(["make-model", "--arch", "olmoe", "--router-std", "1.0", "--out", str(model_dir)]) == 0
    calib = root / "calib.txt"
    calib.write_text(_calibration_text(), encoding="utf-8")
    return root, model_dir, calib


def _profile_args(model_dir, calib, out, *extra):
    return ["profile", "--model", str(model_dir), "--calib", str(calib), "--seq-len", "32", "--max-tokens", "512",
            "--batch-size", "4", "--out", str(out), "--no-progress", *extra]


def test_cli_profile_ppl_lexi_and_plan(cli_env, tmp_path, capsys):
    _, model_dir, calib = cli_env
    out = tmp_path / "S.csv"
    assert main(_profile_args(model_dir, calib, out)) == 0
    assert "wrote" in capsys.readouterr().out
    layers, S = read_sensitivity(out)
    assert layers == [0, 1, 2, 3] and S.shape == (4, 2)
    assert np.isfinite(S).all() and (S > 1).all()
    assert out.read_text().splitlines()[0] == "layer,k,value" and len(out.read_text().splitlines()) == 1 + 4 * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S.csv"]  # checkpoint deleted, no temp files

    # S[last, K_orig] is the original model's perplexity on the same 16 windows of 32 tokens
    model, tok = load_model(str(model_dir), device="cpu", dtype="float32")
    win = tokenize_windows(load_calibration(str(calib)), tok, seq_len=32, max_tokens=512)
    assert win.input_ids.shape == (16, 32)
    assert S[-1, -1] == pytest.approx(perplexity(model, win, batch_size=4, progress=False).ppl, rel=1e-6)
    _, S_naive = profile_perplexity(model, win.input_ids, batch_size=4, prefix_reuse=False, progress=False)
    np.testing.assert_allclose(S, S_naive, rtol=1e-5)

    lexi = tmp_path / "L.csv"
    assert main(["profile", "--model", str(model_dir), "--method", "lexi", "--lexi-tokens", "32", "--lexi-draws", "2",
                 "--out", str(lexi), "--no-progress"]) == 0
    layers_l, SL = read_sensitivity(lexi)
    assert layers_l == [0, 1, 2, 3] and SL.shape == (4, 2) and (SL[:, 1] == 0).all() and (SL[:, 0] > 0).all()

    for sens, method in ((out, "alloc-l"), (lexi, "lexi")):
        plan_path = tmp_path / f"plan-{method}.json"
        assert main(["plan", "--sensitivity", str(sens), "--method", method, "--budget", "6",
                     "--model", str(model_dir), "--out", str(plan_path)]) == 0
        plan = Plan.load(plan_path)
        assert plan.moe_layers == [0, 1, 2, 3] and plan.k_orig == 2 and plan.budget == 6
        assert all(k in (1, 2) for k in plan.k_per_layer)
        # alloc-l may leave budget unspent where fewer experts measured better; LExI costs are > 0 below K_orig
        assert sum(plan.k_per_layer) == 6 if method == "lexi" else sum(plan.k_per_layer) <= 6
        with apply(model, plan):
            assert [m.gate.top_k for m in moe_layers(model)] == plan.k_per_layer
    capsys.readouterr()


def test_cli_profile_interrupted_then_resumed(cli_env, tmp_path, monkeypatch, capsys):
    _, model_dir, calib = cli_env
    ref = tmp_path / "ref.csv"
    assert main(_profile_args(model_dir, calib, ref, "--no-prefix-reuse")) == 0
    out = tmp_path / "S.csv"
    ckpt = tmp_path / "S.csv.ckpt.json"
    real = profiling._naive_rows
    monkeypatch.setattr(profiling, "_naive_rows", _dying(real, 3))
    capsys.readouterr()
    assert main(_profile_args(model_dir, calib, out, "--no-prefix-reuse")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and ckpt.exists()
    assert sorted(json.loads(ckpt.read_text())["rows"]) == ["0", "1", "2"]
    monkeypatch.setattr(profiling, "_naive_rows", real)
    # the checkpoint belongs to the naive run: a prefix-reuse run is a different run
    assert main(_profile_args(model_dir, calib, out)) == 2
    assert "different profiling run" in capsys.readouterr().err and ckpt.exists() and not out.exists()
    assert main(_profile_args(model_dir, calib, out, "--no-prefix-reuse")) == 0
    assert not ckpt.exists()
    a, b = read_sensitivity(out), read_sensitivity(ref)
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["missing-calib", "unknown-calib", "missing-model", "missing-calib-file",
                                  "bad-seq-len"])
def test_cli_profile_bad_input(cli_env, tmp_path, capsys, case):
    _, model_dir, calib = cli_env
    out = tmp_path / "S.csv"
    args = {
        "missing-calib": ["profile", "--model", str(model_dir), "--out", str(out)],
        "unknown-calib": ["profile", "--model", str(model_dir), "--calib", "no-such-corpus", "--out", str(out)],
        "missing-model": ["profile", "--model", str(tmp_path / "no-model"), "--calib", str(calib), "--out", str(out)],
        "missing-calib-file": ["profile", "--model", str(model_dir), "--calib", str(tmp_path / "nope.txt"),
                               "--out", str(out)],
        "bad-seq-len": ["profile", "--model", str(model_dir), "--calib", str(calib), "--seq-len", "0",
                        "--out", str(out)],
    }[case]
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alloc-moe profile: error:"), err
    assert not out.exists()
    assert not (tmp_path / "S.csv.ckpt.json").exists()


def test_cli_resume_after_model_rewritten_is_refused_or_recomputed(cli_env, tmp_path, monkeypatch, capsys):
    _, _, calib = cli_env
    model_dir = tmp_path / "m"
    assert main(["make-model", "--arch", "olmoe", "--router-std", "1.0", "--out", str(model_dir)]) == 0
    out = tmp_path / "S.csv"
    real = profiling._suffix_rows
    monkeypatch.setattr(profiling, "_suffix_rows", _dying(real, 2))
    assert main(_profile_args(model_dir, calib, out)) == 130
    monkeypatch.setattr(profiling, "_suffix_rows", real)
    # a different model at the same path
    assert main(["make-model", "--arch", "olmoe", "--router-std", "1.0", "--seed", "7", "--overwrite",
                 "--out", str(model_dir)]) == 0
    fresh = tmp_path / "fresh.csv"
    assert main(_profile_args(model_dir, calib, fresh)) == 0
    capsys.readouterr()
    rc = main(_profile_args(model_dir, calib, out))
    if rc == 2:  # refused: fine, with a one-line error
        assert "different" in capsys.readouterr().err
        return
    assert rc == 0
    np.testing.assert_allclose(read_sensitivity(out)[1], read_sensitivity(fresh)[1], rtol=1e-12)


def test_cli_corrupt_checkpoint_is_a_one_line_error(cli_env, tmp_path, capsys):
    _, model_dir, calib = cli_env
    out = tmp_path / "S.csv"
    (tmp_path / "S.csv.ckpt.json").write_text("{", encoding="utf-8")
    capsys.readouterr()
    assert main(_profile_args(model_dir, calib, out)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "checkpoint" in lines[0]
    assert not out.exists()
