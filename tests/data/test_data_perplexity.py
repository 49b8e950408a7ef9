"""Calibration loading, windowing and perplexity against a tiny offline model and tokenizer."""

import json
import math
import sys
import types

import pytest
import torch

from alloc_moe.backends.hf.perplexity import (
    PerplexityResult,
    nll_from_logits,
    perplexity,
    window_nll,
)
from alloc_moe.data import text as data
from alloc_moe.data.text import (
    SOURCES,
    Document,
    Windows,
    load_calibration,
    tokenize_windows,
)
from alloc_moe.errors import AllocMoeError

TEXT_A = "The quick brown fox jumps over the lazy dog. " * 12
TEXT_B = "Sphinx of black quartz, judge my vow! 0123456789 " * 9


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # 256 byte symbols
    for s in ("<s>", "</s>", "<pad>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        initializer_range=0.3,  # large weights so logits are far from uniform
    )
    return OlmoeForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def windows(tokenizer):
    docs = [Document(TEXT_A, "alpha"), Document(TEXT_B, "beta"), Document(TEXT_A[::-1], "alpha")]
    return tokenize_windows(docs, tokenizer, seq_len=24)


def reference_ppl(model, windows):
    """Independent check: one window at a time, log-softmax by hand in float64."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in windows.input_ids:
            logits = model(input_ids=row[None]).logits[0].double()  # [S, V]
            m = logits.max(-1, keepdim=True).values
            logp = logits - m - (logits - m).exp().sum(-1, keepdim=True).log()
            nll -= logp[torch.arange(len(row) - 1), row[1:]].sum().item()  # log p(x_{t+1} | x_<=t)
            n += len(row) - 1
    return math.exp(nll / n), nll, n


# ------------------------------------------------------------------------------------ perplexity


def test_matches_naive_reference(model, windows):
    res = perplexity(model, windows, batch_size=4, progress=False)
    ppl, nll, n = reference_ppl(model, windows)
    assert isinstance(res, PerplexityResult)
    assert res.n_tokens == n == len(windows) * 23
    assert res.nll_sum == pytest.approx(nll, rel=1e-6)
    assert res.ppl == pytest.approx(ppl, rel=1e-6)
    assert 1.0 < res.ppl < 1e6, res.ppl


def test_batch_size_invariant_and_deterministic(model, windows):
    results = [perplexity(model, windows, batch_size=b, progress=False) for b in (1, 3, 8)]
    for r in results[1:]:
        assert r.ppl == pytest.approx(results[0].ppl, rel=1e-6)
        assert r.n_tokens == results[0].n_tokens
    again = perplexity(model, windows, batch_size=3, progress=False)
    assert again.to_dict() == results[1].to_dict()


def test_per_family_sums_to_overall(model, windows):
    res = perplexity(model, windows, batch_size=5, progress=False)
    assert sorted(res.per_family) == ["alpha", "beta"]
    assert sum(n for _, n in res.per_family.values()) == res.n_tokens
    nll = sum(math.log(p) * n for p, n in res.per_family.values())
    assert nll == pytest.approx(res.nll_sum, rel=1e-9)
    d = res.to_dict()
    json.dumps(d)
    assert d["per_family"]["beta"]["n_tokens"] == windows.families.count("beta") * 23


def test_progress_bar_and_training_mode(model, windows, capsys):
    model.train()
    try:
        res = perplexity(model, windows, batch_size=8, desc="unit-ppl")
        assert model.training  # restored
    finally:
        model.eval()
    assert "unit-ppl" in capsys.readouterr().err
    assert res.ppl == pytest.approx(perplexity(model, windows, progress=False).ppl, rel=1e-6)


def test_window_nll_and_nll_from_logits(model, windows):
    ids = windows.input_ids[:3]  # [3, S]
    nll = window_nll(model, ids)
    assert nll.shape == (3,) and nll.dtype == torch.float64
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.allclose(nll_from_logits(logits, ids), nll, rtol=1e-6)
    # Masking the last 5 positions drops exactly their targets.
    mask = torch.ones_like(ids)
    mask[:, -5:] = 0
    per_tok = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    want = per_tok.view(3, -1)[:, :-5].double().sum(-1)
    assert torch.allclose(nll_from_logits(logits, ids, mask), want, rtol=1e-6)


def test_perplexity_bad_input(model, windows):
    with pytest.raises(AllocMoeError, match="batch_size"):
        perplexity(model, windows, batch_size=0, progress=False)
    with pytest.raises(AllocMoeError, match="at least one window"):
        perplexity(model, Windows(torch.zeros(0, 8, dtype=torch.long), []), progress=False)


# ------------------------------------------------------------------------------------- windowing


def test_windows_shape_and_bos(tokenizer, windows):
    bos = tokenizer.bos_token_id
    assert windows.input_ids.shape[1] == 24 and windows.input_ids.dtype == torch.long
    assert (windows.input_ids[:, 0] == bos).all()
    assert (windows.input_ids[:, 1:] != bos).all()
    fams = windows.families
    assert fams == sorted(fams) and set(fams) == {"alpha", "beta"}
    # alpha's two documents are joined with "\n\n" and tokenized once; incomplete tail dropped.
    n_alpha = len(tokenizer(TEXT_A + "\n\n" + TEXT_A[::-1], add_special_tokens=False)["input_ids"])
    assert fams.count("alpha") == n_alpha // 23
    first = tokenizer(TEXT_A, add_special_tokens=False)["input_ids"][:23]
    assert windows.input_ids[0, 1:].tolist() == first


def test_windows_without_bos(tokenizer):
    w = tokenize_windows([Document(TEXT_B, "x")], tokenizer, seq_len=16, add_bos=False)
    ids = tokenizer(TEXT_B, add_special_tokens=False)["input_ids"]
    assert w.input_ids.shape == (len(ids) // 16, 16)
    assert w.input_ids.flatten().tolist() == ids[: w.input_ids.numel()]


def test_max_tokens_cap_is_proportional_and_whole(tokenizer, windows):
    docs = [Document(TEXT_A, "alpha"), Document(TEXT_B, "beta"), Document(TEXT_A[::-1], "alpha")]
    full = {f: windows.families.count(f) for f in ("alpha", "beta")}
    capped = tokenize_windows(docs, tokenizer, seq_len=24, max_tokens=24 * 10 + 7)
    assert len(capped) == 10 and capped.input_ids.numel() <= 24 * 10 + 7
    got = {f: capped.families.count(f) for f in full}
    total = sum(full.values())
    for f in full:
        assert abs(got[f] - 10 * full[f] / total) < 1
    # Each family keeps its first windows.
    a = [i for i, f in enumerate(windows.families) if f == "alpha"][: got["alpha"]]
    assert torch.equal(capped.input_ids[: got["alpha"]], windows.input_ids[a])
    again = tokenize_windows(docs, tokenizer, seq_len=24, max_tokens=24 * 10 + 7)
    assert torch.equal(again.input_ids, capped.input_ids) and again.families == capped.families
    assert len(tokenize_windows(docs, tokenizer, seq_len=24, max_tokens=10**9)) == len(windows)


def test_tokenize_bad_input(tokenizer):
    docs = [Document("short text", "x")]
    with pytest.raises(AllocMoeError, match=r"10 tokens.*seq_len=64"):
        tokenize_windows(docs, tokenizer, seq_len=64)
    with pytest.raises(AllocMoeError, match="seq_len"):
        tokenize_windows(docs, tokenizer, seq_len=1)
    with pytest.raises(AllocMoeError, match="max_tokens"):
        tokenize_windows([Document(TEXT_A, "x")], tokenizer, seq_len=16, max_tokens=8)
    with pytest.raises(AllocMoeError, match="no calibration documents"):
        tokenize_windows([], tokenizer, seq_len=16)


# --------------------------------------------------------------------------------------- loading


def test_load_txt_and_jsonl(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("line one\nline two\n", encoding="utf-8")
    assert load_calibration(str(txt)) == [Document("line one\nline two\n", "notes")]

    jl = tmp_path / "mix.jsonl"
    rows = [{"text": "a b c", "family": "code"}, {"text": "d e f"}, {"text": "g h", "family": "web"}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = load_calibration(str(jl))
    assert docs == [Document("a b c", "code"), Document("d e f", "mix"), Document("g h", "web")]
    assert load_calibration(str(jl), max_chars=7) == [Document("a b c", "code"), Document("d ", "mix")]


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("missing.txt", None, r"not found.*missing\.txt"),
        ("empty.txt", "  \n", r"empty"),
        ("empty.jsonl", "\n\n", r"empty"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"line 2.*invalid JSON"),
        ("notext.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r"line 3.*\"text\""),
        ("fam.jsonl", '{"text": "ok", "family": 3}\n', r"line 1.*family"),
        ("data.csv", "text\nhello\n", r"\.txt or \.jsonl"),
    ],
)
def test_load_local_errors(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(AllocMoeError, match=pattern) as e:
        load_calibration(str(path))
    assert "\n" not in str(e.value)


def test_load_argument_errors(tmp_path):
    with pytest.raises(AllocMoeError, match=r"unknown calibration source 'wiki'.*c4, pile, wikitext2.*\.jsonl"):
        load_calibration("wiki")
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(AllocMoeError, match="split"):
        load_calibration(str(tmp_path / "a.txt"), split="test")
    with pytest.raises(AllocMoeError, match="max_chars"):
        load_calibration(str(tmp_path / "a.txt"), max_chars=0)


@pytest.mark.parametrize("var", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_source_offline(monkeypatch, var):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    # A `datasets` that explodes on use proves no hub access is attempted.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(AllocMoeError, match=rf"'c4'.*{var}.*local \.txt or \.jsonl path") as e:
        load_calibration("c4")
    assert "\n" not in str(e.value)


def fake_datasets(monkeypatch, load):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hub_source_failure_is_one_line(monkeypatch):
    def load(**kw):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub\n(details...)")

    fake_datasets(monkeypatch, load)
    with pytest.raises(
        AllocMoeError, match=r"'wikitext2'.*ConnectionError.*Couldn't reach.*local \.txt or \.jsonl"
    ) as e:
        load_calibration("wikitext2")
    assert "\n" not in str(e.value)


def test_hub_source_pinned_arguments(monkeypatch):
    calls = []

    def load(**kw):
        calls.append(kw)
        return {"text": ["first", "", "third"]}

    fake_datasets(monkeypatch, load)
    assert load_calibration("wikitext2") == [Document(t, "wikitext2") for t in ("first", "", "third")]
    assert calls[-1] == dict(
        path="Salesforce/wikitext", name="wikitext-2-raw-v1", revision=data.WIKITEXT_REVISION, split="test"
    )
    load_calibration("c4", split="validation[:10]", max_chars=3)
    assert calls[-1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert calls[-1]["split"] == "validation[:10]" and calls[-1]["revision"] == data.C4_REVISION
    load_calibration("pile")
    assert calls[-1]["path"] == "mit-han-lab/pile-val-backup" and calls[-1]["split"] == "validation"
    for spec in SOURCES.values():
        assert len(spec.revision) == 40 and int(spec.revision, 16) >= 0


def test_hub_source_reads_real_dataset_object(monkeypatch):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(2500)], "meta": list(range(2500))})
    fake_datasets(monkeypatch, lambda **kw: ds)
    docs = load_calibration("pile")
    assert len(docs) == 2500 and docs[2499] == Document("row 2499", "pile")
