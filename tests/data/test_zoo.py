import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from alloc_moe.data import zoo
from alloc_moe.errors import AllocMoeError

ARCHS = list(zoo.ZOO_SHAPES)
_TOK = zoo.make_tokenizer()


def _logits(model, tok):
    batch = tok(["The cat sat", "a"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _mean_max_prob(model, tok) -> float:
    """Mean over tokens and MoE layers of the largest routing probability."""
    maxes = []

    def record(router, args):
        probs = torch.softmax(args[0].reshape(-1, router.weight.shape[1]) @ router.weight.T, dim=-1)
        maxes.append(probs.max(dim=-1).values.mean())

    hooks = [model.model.layers[i].mlp.gate.register_forward_pre_hook(record) for i in zoo.moe_layer_indices(model)]
    _logits(model, tok)
    for h in hooks:
        h.remove()
    return torch.stack(maxes).mean().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_write_and_load_roundtrip(arch, tmp_path):
    out = tmp_path / arch
    model = zoo.write_model(out, arch=arch, seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert loaded.config.model_type == arch
    assert torch.equal(_logits(model, tok), _logits(loaded, tok))
    assert zoo.moe_layer_indices(loaded) == zoo.moe_layer_indices(model)
    assert (zoo.num_experts(loaded), zoo.k_orig(loaded)) == (8, 2)
    meta = json.loads((out / "alloc_moe_zoo.json").read_text())
    assert meta["arch"] == arch and meta["seed"] == 3 and meta["width"] == "tiny"
    assert list(tmp_path.iterdir()) == [out]  # no temp dirs left behind


def test_generic_layouts():
    ds = zoo.make_model("deepseek_v2")
    assert zoo.moe_layer_indices(ds) == [1, 2, 3] and hasattr(ds.model.layers[1].mlp, "shared_experts")
    qw = zoo.make_model("qwen2_moe")
    assert hasattr(qw.model.layers[0].mlp, "shared_expert") and hasattr(qw.model.layers[0].mlp, "shared_expert_gate")
    assert zoo.make_config("qwen3_moe").norm_topk_prob is True
    assert zoo.make_config("mixtral").num_local_experts == 8


# topology -> (layers, MoE layers, experts, top-k, params at full width)
PUBLISHED = {
    "deepseek-v2-lite": (27, 26, 64, 6, 15.71e9),
    "qwen1.5-moe-a2.7b": (24, 24, 60, 4, 14.32e9),
    "olmoe-1b-7b-0924": (16, 16, 64, 8, 6.92e9),
}


@pytest.mark.parametrize("topology", list(PUBLISHED))
def test_topology_tiny_keeps_layout(topology):
    layers, moe_layers, experts, k, _ = PUBLISHED[topology]
    model = zoo.make_model(topology=topology)
    cfg = model.config
    assert cfg.num_hidden_layers == layers == len(model.model.layers)
    assert len(zoo.moe_layer_indices(model)) == moe_layers
    assert (zoo.num_experts(model), zoo.k_orig(model)) == (experts, k)
    assert cfg.norm_topk_prob is False
    assert sum(p.numel() for p in model.parameters()) < 4e6
    mlp = model.model.layers[-1].mlp
    if topology == "deepseek-v2-lite":
        assert zoo.moe_layer_indices(model)[0] == 1 and cfg.first_k_dense_replace == 1
        assert (cfg.n_shared_experts, cfg.routed_scaling_factor, cfg.topk_method) == (2, 1.0, "greedy")
        assert mlp.shared_experts.gate_proj.out_features == 2 * cfg.moe_intermediate_size
    elif topology == "qwen1.5-moe-a2.7b":
        assert mlp.shared_expert.gate_proj.out_features == 4 * cfg.moe_intermediate_size
        assert mlp.shared_expert_gate.out_features == 1
    else:
        assert not hasattr(mlp, "shared_expert") and not hasattr(mlp, "shared_experts")
    tok = zoo.make_tokenizer()
    assert torch.isfinite(_logits(model, tok)).all()


@pytest.mark.parametrize("topology", list(PUBLISHED))
def test_topology_full_width_param_count(topology):
    *_, params = PUBLISHED[topology]
    with torch.device("meta"):
        model = zoo.make_model(topology=topology, width="full")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01
    assert model.config.vocab_size > 50_000  # real vocab kept


def test_layers_override_keeps_dense_first_layer():
    model = zoo.make_model(topology="deepseek-v2-lite", layers=3)
    assert len(model.model.layers) == 3 and zoo.moe_layer_indices(model) == [1, 2]
    assert zoo.k_orig(model) == 6
    assert zoo.moe_layer_indices(zoo.make_model("qwen2_moe", layers=2)) == [0, 1]


def test_router_std_peaks_routing_and_touches_only_routers():
    tok = zoo.make_tokenizer()
    plain = zoo.make_model("deepseek_v2")
    peaked = zoo.make_model("deepseek_v2", router_std=1.0)
    assert _mean_max_prob(plain, tok) < 0.2  # 8 experts: ~uniform is 0.125
    assert _mean_max_prob(peaked, tok) > 0.4
    a, b = plain.state_dict(), peaked.state_dict()
    changed = {name for name in a if not torch.equal(a[name], b[name])}
    assert changed == {f"model.layers.{i}.mlp.gate.weight" for i in (1, 2, 3)}


def test_same_seed_same_weights():
    a = zoo.make_model("qwen2_moe", seed=7, router_std=0.5).state_dict()
    b = zoo.make_model("qwen2_moe", seed=7, router_std=0.5).state_dict()
    c = zoo.make_model("qwen2_moe", seed=8, router_std=0.5).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.layers.0.mlp.gate.weight"], c["model.layers.0.mlp.gate.weight"])


def test_tokenizer_specials_and_padding_side():
    tok = zoo.make_tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len(tok) == 259 and tok.padding_side == "left"
    assert tok("héllo")["input_ids"] == list("héllo".encode())
    assert tok("a</s>")["input_ids"] == list(b"a</s>")  # special-token text stays text
    assert tok.decode([97, tok.eos_token_id], skip_special_tokens=True) == "a"
    assert zoo.make_tokenizer(padding_side="right").padding_side == "right"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_tokenizer_roundtrips_any_text(text):
    tok = _TOK
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_tokenizer_roundtrips_non_ascii():
    text = "Grüße, naïve café — 日本語テキスト 🙂 \n\tend  "
    assert _TOK.decode(_TOK(text)["input_ids"]) == text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arch="gpt2"), "allowed: deepseek_v2"),
        (dict(arch="olmoe", topology="deepseek-v2-lite"), "deepseek_v2"),
        (dict(arch=None, topology="mixtral-8x7b"), "allowed: deepseek-v2-lite"),
        (dict(arch=None), "give an arch"),
        (dict(arch="olmoe", layers=0), "layers"),
        (dict(arch="deepseek_v2", layers=1), ">= 2"),
        (dict(arch="olmoe", width="huge"), "allowed: tiny, small, full"),
        (dict(arch="olmoe", width="full"), "needs a topology"),
    ],
)
def test_bad_config_input(kwargs, match):
    arch = kwargs.pop("arch")
    with pytest.raises(AllocMoeError, match=match):
        zoo.make_config(arch, **kwargs)


def test_out_dir_rules(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(AllocMoeError, match="not empty"):
        zoo.write_model(out, arch="mixtral")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    zoo.write_model(out, arch="mixtral", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    zoo.write_model(empty, arch="mixtral")  # an existing empty dir is fine

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(zoo, "make_tokenizer", boom)
    with pytest.raises(RuntimeError):
        zoo.write_model(tmp_path / "half", arch="mixtral")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m"]  # nothing half-written


def test_cli_make_model(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="alloc-moe")
    zoo.register_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "olmoe"
    args = parser.parse_args(
        ["make-model", "--topology", "olmoe-1b-7b-0924", "--layers", "2", "--router-std", "0.5", "--seed", "1"]
        + ["--out", str(out)]
    )
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "64 experts" in line and "top-8" in line and "2/2 MoE layers" in line
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "olmoe" and zoo.k_orig(model) == 8
    assert torch.isfinite(_logits(model, AutoTokenizer.from_pretrained(out))).all()
    meta = json.loads((out / "alloc_moe_zoo.json").read_text())
    assert (meta["topology"], meta["router_std"], meta["layers"]) == ("olmoe-1b-7b-0924", 0.5, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["make-model", "--arch", "gpt2", "--out", str(out)])


@pytest.mark.parametrize("arch", sorted(zoo.ZOO_SHAPES))
def test_small_width_has_vllm_cpu_shapes(arch):
    # vLLM's CPU attention needs head_dim >= 32; DeepSeek-V2's MLA needs kv_lora_rank + qk_rope_head_dim == 576
    cfg = zoo.make_config(arch, width="small")
    assert cfg.hidden_size // cfg.num_attention_heads >= 32
    if arch == "deepseek_v2":
        assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576 and cfg.first_k_dense_replace == 1
    model = zoo.make_model(arch, width="small")
    assert zoo.k_orig(model) == 4 and zoo.num_experts(model) == 16


def test_small_width_needs_arch_not_topology():
    with pytest.raises(AllocMoeError, match="generic arch size"):
        zoo.make_config(None, topology="olmoe-1b-7b-0924", width="small")


@pytest.mark.parametrize("arch,topology,width,layers", [
    *((a, None, w, n) for a in ARCHS for w in ("tiny", "small") for n in (None, 3, 5)),
    *((None, t, w, n) for t in zoo.TOPOLOGIES for w in ("tiny", "full") for n in (None, 4)),
])
def test_num_moe_layers_counts_what_make_config_builds(arch, topology, width, layers):
    """The workflow counts MoE layers with `num_moe_layers` (no transformers); it must agree with the config built."""
    cfg = zoo.make_config(arch, topology=topology, layers=layers, width=width)
    expected = cfg.num_hidden_layers - getattr(cfg, "first_k_dense_replace", 0)
    assert zoo.num_moe_layers(arch, topology=topology, layers=layers, width=width) == expected


def test_the_workflows_start_imports_neither_torch_nor_transformers():
    """What the workflow's rule files import from alloc_moe at the start of every Snakemake run (and of every cluster
    job, which starts its own) stays light: importing torch and transformers there cost about 5 s of CPU per start."""
    import subprocess
    import sys

    rules = Path(__file__).resolve().parents[2] / "workflow/rules"
    modules = sorted({m for f in rules.glob("*.smk")
                      for m in re.findall(r"^\s*from (alloc_moe[\w.]*) import", f.read_text(), re.MULTILINE)})
    assert "alloc_moe.data.text" in modules and "alloc_moe.data.train_config" in modules  # the scan finds them
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "from alloc_moe.data import zoo\n"
            "zoo.num_moe_layers('olmoe', layers=8, width='small')\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", modules
