"""The Hugging Face backend (`alloc_moe.backends.hf.apply`): exactness at K_orig, real compute savings counted inside the
expert GEMMs, routing semantics against hand-written references, padding, plan/model mismatch and routing stats.

Everything runs on tiny zoo models (a few MB) on CPU.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from alloc_moe import AllocMoeError, Plan, build_plan
from alloc_moe.backends.hf.apply import (
    ARCHITECTURES,
    AppliedPlan,
    ExpertRowCounter,
    apply,
    moe_layers,
)
from alloc_moe.backends.hf.stats import RoutingStats, load_routing_scores
from alloc_moe.data import zoo

ARCHS = list(zoo.ZOO_SHAPES)
IMPLS = ["eager", "grouped_mm"]
TOK = zoo.make_tokenizer(padding_side="left")


# ------------------------------------------------------------------------------------------------ helpers


def build(arch, *, impl="eager", dtype=torch.float32, k=None, router_std=None, seed=0, layers=None, **cfg):
    """A tiny zoo model of `arch`, optionally with another top-k (K_orig) or other config fields."""
    overrides = {**cfg, **({"num_experts_per_tok": k} if k is not None else {})}
    return zoo.make_model(arch, layers=layers, seed=seed, router_std=router_std, dtype=dtype,
                          experts_implementation=impl, overrides=overrides)


def ids_of(batch=2, seq=12, seed=0):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def make_plan(model, ks, mode="topk", k_base=1, thresholds=None):
    layers = moe_layers(model)
    return Plan(
        model="test", moe_layers=[m.index for m in layers], k_orig=layers[0].k_orig, budget=float(sum(ks)),
        layer_method="uniform", k_per_layer=list(ks), token_allocation=mode, k_base=k_base, thresholds=thresholds,
    )


def k_orig_plans(model):
    layers = moe_layers(model)
    K = layers[0].k_orig
    return make_plan(model, [K] * len(layers)), make_plan(model, [float(K)] * len(layers), "alloc-t")


def logits(model, input_ids, **kw):
    with torch.no_grad():
        return model(input_ids=input_ids, **kw).logits


def assert_clean(model, top_k):
    """No hook, flag or attribute of ours is left on the model."""
    base = model.model
    assert not base._forward_pre_hooks and not base._forward_hooks
    assert not hasattr(model, "_alloc_moe_applied")
    for m in moe_layers(model):
        assert not m.gate._forward_hooks and not m.gate._forward_pre_hooks
        assert not m.experts._forward_pre_hooks and not m.experts._forward_hooks
        assert not m.block._forward_hooks and not m.block._forward_pre_hooks
        assert m.gate.top_k == top_k
        assert m.experts._is_expert_parallel is False
        assert not hasattr(m.gate, "_alloc_moe_k_orig")


class SlotRecorder:
    """Forward pre-hook on every experts module (registered after `apply`, so it sees the final routing)."""

    def __init__(self, model):
        self.index: dict[int, list[torch.Tensor]] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}
        self._handles = []
        for m in moe_layers(model):
            def hook(mod, args, kwargs, i=m.index):
                self.index.setdefault(i, []).append(args[1].clone())
                self.weights.setdefault(i, []).append(args[2].clone())
            self._handles.append(m.experts.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self):
        for h in self._handles:
            h.remove()


# ------------------------------------------------------------------------ 1. exact at K_orig, clean removal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_k_orig_plans_are_bit_exact_and_removal_restores(arch, impl, dtype):
    model = build(arch, impl=impl, dtype=dtype, router_std=1.0)
    K = moe_layers(model)[0].k_orig
    ids = ids_of()
    ref = logits(model, ids)
    topk, alloct = k_orig_plans(model)

    # top-k at K_orig, with the stats hooks attached too
    handle = apply(model, topk, stats=True)
    assert isinstance(handle, AppliedPlan)
    assert torch.equal(logits(model, ids), ref)
    assert sum(handle.stats.computed_pairs().values()) == ids.numel() * K * len(moe_layers(model))
    handle.remove()
    handle.remove()  # idempotent
    assert_clean(model, K)
    assert torch.equal(logits(model, ids), ref)

    # alloc-t at K_orig (router hook + sentinel machinery active, nothing dropped), with and without a mask
    with apply(model, alloct) as h:
        assert all(m.experts._is_expert_parallel for m in moe_layers(model))
        assert all(len(m.gate._forward_hooks) == 1 for m in moe_layers(model))
        assert len(model.model._forward_pre_hooks) == 1
        assert torch.equal(logits(model, ids), ref)
        assert torch.equal(logits(model, ids, attention_mask=torch.ones_like(ids)), ref)
    assert h._removed
    assert_clean(model, K)
    assert torch.equal(logits(model, ids), ref)

    # a removed model can take a new plan
    with apply(model, alloct, stats=True):
        assert torch.equal(logits(model, ids), ref)
    assert_clean(model, K)


def test_with_block_removes_on_exception():
    model = build("olmoe")
    _, alloct = k_orig_plans(model)
    with pytest.raises(RuntimeError, match="boom"):
        with apply(model, alloct):
            raise RuntimeError("boom")
    assert_clean(model, 2)


# ------------------------------------------------------------------------------- 2. generate, left padding


def _generate(model, batch):
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=5, min_new_tokens=5,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=zoo.PAD_ID)
    return out.sequences, torch.stack(out.scores)


def _left_padded():
    batch = TOK(["The cat sat on the mat and", "Hi"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][0].all()  # left padded
    return batch


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_left_padding_at_k_orig(arch, impl):
    model = build(arch, impl=impl, router_std=1.0)
    batch = _left_padded()
    ref_seq, ref_scores = _generate(model, batch)
    topk, alloct = k_orig_plans(model)
    with apply(model, topk):
        seq, scores = _generate(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)
    with apply(model, alloct):
        seq, scores = _generate(model, batch)
    assert torch.equal(seq, ref_seq)
    # alloc-t gives padding tokens no experts, which changes the expert GEMM shapes: equal up to rounding only
    # (exact equality: see test_alloc_t_at_k_orig_is_a_no_op_on_padded_batch below)
    finite = ref_scores.isfinite()
    assert torch.equal(finite, scores.isfinite())
    torch.testing.assert_close(scores[finite], ref_scores[finite], rtol=0, atol=1e-5)
    # no padding at all: bit exact
    one = TOK(["The cat sat on the mat and"], return_tensors="pt")
    ref_seq, ref_scores = _generate(model, one)
    with apply(model, alloct):
        seq, scores = _generate(model, one)
    assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)
    assert_clean(model, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2"])
def test_alloc_t_at_k_orig_is_a_no_op_on_padded_batch(arch, impl):
    model = build(arch, impl=impl, router_std=1.0)
    batch = _left_padded()
    rec = SlotRecorder(model)
    ref = logits(model, **batch)
    rec.remove()
    ref_seq, ref_scores = _generate(model, batch)
    with apply(model, k_orig_plans(model)[1]):
        got = SlotRecorder(model)
        out = logits(model, **batch)
        got.remove()
        seq, scores = _generate(model, batch)
    for i in rec.index:  # the experts should see the unpatched routing: every pair kept, padding included
        assert torch.equal(got.index[i][0], rec.index[i][0])
        assert torch.equal(got.weights[i][0], rec.weights[i][0])
    assert torch.equal(out, ref)
    assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)


# -------------------------------------------------------------------------------- 3. real compute savings


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_topk_mixed_k_rows_counted_in_gemms(arch, impl):
    model = build(arch, impl=impl, k=3)
    layers = moe_layers(model)
    ks = [1, 3, 2, 1][: len(layers)]
    ids = ids_of(2, 11)
    T = ids.numel()
    with apply(model, make_plan(model, ks), stats=True) as h:
        assert [m.gate.top_k for m in layers] == ks
        with ExpertRowCounter(model) as counter:
            logits(model, ids)
    expected = {m.index: T * k for m, k in zip(layers, ks)}
    assert counter.rows == expected
    assert h.stats.computed_pairs() == expected
    assert [m.gate.top_k for m in layers] == [3] * len(layers)  # restored
    # unpatched: every slot computed
    with ExpertRowCounter(model) as counter:
        logits(model, ids)
    assert counter.rows == {m.index: 3 * T for m in layers}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_alloc_t_fractional_k_rows_are_floor_without_padding(arch, impl):
    model = build(arch, impl=impl, k=3, router_std=1.0)
    layers = moe_layers(model)
    ks = [1.5, 2.5, 1.25, 2.75][: len(layers)]
    ids = ids_of(2, 13)
    T = ids.numel()  # 26: T * 1.5 = 39, T * 2.5 = 65, T * 1.25 = 32.5, T * 2.75 = 71.5
    with apply(model, make_plan(model, ks, "alloc-t"), stats=True) as h:
        with ExpertRowCounter(model) as counter:
            logits(model, ids)
    expected = {m.index: math.floor(T * k) for m, k in zip(layers, ks)}
    assert counter.rows == expected
    assert h.stats.computed_pairs() == expected
    # each token keeps at least k_base=1 and at most K_orig experts
    for layer, hist in h.stats.per_token.items():
        assert int(hist[0]) == 0 and int(hist.sum()) == T


def test_alloc_t_k_base_two():
    model = build("qwen3_moe", impl="grouped_mm", k=3, router_std=1.0)
    layers = moe_layers(model)
    ks = [2.0, 2.5, 2.25, 3.0]
    ids = ids_of(1, 21)
    T = ids.numel()
    with apply(model, make_plan(model, ks, "alloc-t", k_base=2), stats=True) as h:
        with ExpertRowCounter(model) as counter:
            logits(model, ids)
    assert counter.rows == {m.index: math.floor(T * k) for m, k in zip(layers, ks)}
    for hist in h.stats.per_token.values():
        assert int(hist[0]) == int(hist[1]) == 0  # everyone keeps its top-2


def test_batched_mm_token_mode_warns_topk_does_not():
    model = build("olmoe", impl="batched_mm")
    with pytest.warns(UserWarning, match="batched_mm"):
        h = apply(model, make_plan(model, [1.5] * 4, "alloc-t"))
    h.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply(model, make_plan(model, [1, 2, 1, 2])).remove()
    assert_clean(model, 2)


def test_batched_mm_alloc_t_still_correct_routing():
    """batched_mm computes dropped pairs with weight 0: same output as eager (which skips them) with the same plan."""
    outs = []
    for impl in ("batched_mm", "eager"):
        model = build("mixtral", impl=impl, router_std=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with apply(model, make_plan(model, [1.5, 1.0, 2.0, 1.25], "alloc-t")):
                outs.append(logits(model, ids_of()))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ 4. semantics vs hand references


def _mlp(x, gate_w, up_w, down_w):
    return (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


def _expert(block, e, x):
    ex = block.experts
    inter = ex.gate_up_proj.shape[1] // 2
    gu = ex.gate_up_proj[e]
    return _mlp(x, gu[:inter], gu[inter:], ex.down_proj[e])


def _shared(block, x):
    if hasattr(block, "shared_experts"):  # deepseek_v2
        s = block.shared_experts
        return _mlp(x, s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
    if hasattr(block, "shared_expert"):  # qwen2_moe
        s = block.shared_expert
        gate = torch.sigmoid(x @ block.shared_expert_gate.weight.T)
        return gate * _mlp(x, s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
    return torch.zeros_like(x)


def _ref_alloc_t(probs, K, k_layer, k_base):
    """Alloc-T by hand: top-k_base per token, then the globally best remaining top-K candidates."""
    T, E = probs.shape
    keep = torch.zeros(T, E, dtype=torch.bool)
    extra = []
    for t in range(T):
        order = sorted(range(E), key=lambda e: -float(probs[t, e]))[:K]
        for r, e in enumerate(order):
            if r < k_base:
                keep[t, e] = True
            else:
                extra.append((float(probs[t, e]), t, e))
    extra.sort(reverse=True)
    for _, t, e in extra[: math.floor(T * k_layer + 1e-9) - T * k_base]:
        keep[t, e] = True
    return keep


def _ref_topk(probs, k):
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(k, dim=-1).indices, True)


def _ref_block(block, x, keep, *, renorm, scale=1.0, shared=True):
    """sum over kept e of w_e * expert_e(x) (+ shared), weights from the full softmax of the router logits."""
    probs = (x.float() @ block.gate.weight.float().T).softmax(dim=-1)
    w = probs * keep
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    w = w * scale
    out = torch.zeros_like(x)
    for e in range(probs.shape[1]):
        out += w[:, e : e + 1] * _expert(block, e, x)
    return out + _shared(block, x) if shared else out


# (arch, config overrides, expected renormalisation, routed scaling)
SEMANTICS = [
    ("mixtral", {}, True, 1.0),
    ("qwen3_moe", {"norm_topk_prob": True}, True, 1.0),
    ("qwen3_moe", {"norm_topk_prob": False}, False, 1.0),
    ("olmoe", {"norm_topk_prob": False}, False, 1.0),
    ("olmoe", {"norm_topk_prob": True}, True, 1.0),
    ("qwen2_moe", {"norm_topk_prob": False}, False, 1.0),
    ("qwen2_moe", {"norm_topk_prob": True}, True, 1.0),
    ("deepseek_v2", {"routed_scaling_factor": 2.5}, False, 2.5),
]


@pytest.fixture(scope="module")
def semantic_models():
    return {}


def _semantic_model(cache, arch, cfg, impl="eager"):
    key = (arch, impl, tuple(sorted(cfg.items())))
    if key not in cache:
        cache[key] = build(arch, impl=impl, k=3, router_std=1.0, **cfg)
    return cache[key]


def _close(out, ref):
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
    return scale


@pytest.mark.parametrize("mode,k", [("topk", 1), ("topk", 2), ("alloc-t", 1.5), ("alloc-t", 2.25), ("alloc-t", 1.0)])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch,cfg,renorm,scale", SEMANTICS, ids=[f"{a}-{c}" for a, c, _, _ in SEMANTICS])
def test_block_matches_hand_reference(semantic_models, arch, cfg, renorm, scale, impl, mode, k):
    """grouped_mm also checks that the skipped sentinel rows are zeroed, not left uninitialised."""
    model = _semantic_model(semantic_models, arch, cfg, impl)
    layers = moe_layers(model)
    assert layers[0].renormalize is renorm
    assert model.config.hidden_act == "silu"
    m = layers[1]
    x = torch.randn(1, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        probs = (x[0] @ m.gate.weight.T).softmax(dim=-1)
        keep = _ref_topk(probs, k) if mode == "topk" else _ref_alloc_t(probs, 3, k, 1)
        ks = [3.0 if mode == "alloc-t" else 3] * len(layers)
        ks[1] = k
        with apply(model, make_plan(model, ks, mode)):
            out = m.block(x)[0]
        ref = _ref_block(m.block, x[0], keep, renorm=renorm, scale=scale)
        s = _close(out, ref)
        # the other weighting conventions are clearly distinguishable at this tolerance
        for wrong_renorm, wrong_scale in ((not renorm, scale), (renorm, 1.0)):
            if (wrong_renorm, wrong_scale) != (renorm, scale):
                wrong = _ref_block(m.block, x[0], keep, renorm=wrong_renorm, scale=wrong_scale)
                assert float((wrong - ref).abs().max()) > 1e-3 * s
        # unpatched block = hand reference at K_orig
        _close(m.block(x)[0], _ref_block(m.block, x[0], _ref_topk(probs, 3), renorm=renorm, scale=scale))


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_shared_experts_still_contribute(semantic_models, arch):
    cfg = {"norm_topk_prob": False} if arch == "qwen2_moe" else {"routed_scaling_factor": 2.5}
    model = _semantic_model(semantic_models, arch, cfg)
    layers = moe_layers(model)
    m = layers[-1]
    shared_params = {n: p.clone() for n, p in m.block.named_parameters() if "shared" in n}
    assert shared_params
    x = torch.randn(1, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = (x[0] @ m.gate.weight.T).softmax(dim=-1)
        keep = _ref_alloc_t(probs, 3, 1.0, 1)
        with apply(model, make_plan(model, [1.0] * len(layers), "alloc-t")):
            out = m.block(x)[0]
        scale = cfg.get("routed_scaling_factor", 1.0)
        with_shared = _ref_block(m.block, x[0], keep, renorm=False, scale=scale)
        routed_only = _ref_block(m.block, x[0], keep, renorm=False, scale=scale, shared=False)
        s = _close(out, with_shared)
        assert float((out - routed_only).abs().max()) > 1e-2 * s
    for n, p in m.block.named_parameters():
        if n in shared_params:
            assert torch.equal(p, shared_params[n])


def test_deepseek_unsorted_slots_top1_keeps_argmax(semantic_models):
    model = _semantic_model(semantic_models, "deepseek_v2", {"routed_scaling_factor": 2.5})
    layers = moe_layers(model)
    E = layers[0].num_experts
    ids = ids_of(2, 16, seed=5)
    # the router's own slot order is unsorted (CPU top-k with k=3 does not sort): slot 0 is often not the top-1
    router_out = {}
    hs = [m.gate.register_forward_hook(lambda g, a, o, i=m.index: router_out.__setitem__(i, o)) for m in layers]
    logits(model, ids)
    for h in hs:
        h.remove()
    unsorted = 0
    for i, (lg, w, idx) in router_out.items():
        probs = lg.softmax(-1)
        unsorted += int((idx[:, 0] != probs.argmax(-1)).sum())
    assert unsorted > 0, "test needs unsorted router slots"

    for plan in (make_plan(model, [1.0] * 3, "alloc-t"), make_plan(model, [1] * 3)):
        with apply(model, plan):
            rec = SlotRecorder(model)
            hs = [m.gate.register_forward_hook(lambda g, a, o, i=m.index: router_out.__setitem__(i, o)) for m in layers]
            logits(model, ids)
            for h in hs:
                h.remove()
            rec.remove()
        for m in layers:
            lg = router_out[m.index][0]
            probs = lg.float().softmax(-1)
            index, weights = rec.index[m.index][0], rec.weights[m.index][0]
            valid = index < E
            assert valid.sum(-1).eq(1).all()
            kept = torch.where(valid, index, -1).max(-1).values
            assert torch.equal(kept, probs.argmax(-1))
            kept_w = torch.where(valid, weights, 0).sum(-1)
            torch.testing.assert_close(kept_w, probs.max(-1).values * 2.5, rtol=1e-6, atol=0)
            assert weights[~valid].eq(0).all()


# ---------------------------------------------------------------------------------- 5. padding and budget


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2"])
def test_padding_spends_no_alloc_t_budget(arch, impl):
    model = build(arch, impl=impl, router_std=1.0)
    layers = moe_layers(model)
    E = layers[0].num_experts
    batch = TOK(["A longer first prompt, with commas.", "short", "mid length text"], return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    n_real, n_tok = int(mask.sum()), mask.numel()
    assert n_real < n_tok
    ks = [1.5, 1.75, 1.25, 1.9][: len(layers)]  # below K_orig=2: a K_orig layer is the original one, padding included
    with apply(model, make_plan(model, ks, "alloc-t"), stats=True) as h:
        rec = SlotRecorder(model)
        with ExpertRowCounter(model) as counter:
            logits(model, batch["input_ids"], attention_mask=mask)
        rec.remove()
    expected = {m.index: math.floor(n_real * k) for m, k in zip(layers, ks)}
    assert h.stats.computed_pairs() == expected
    assert counter.rows == expected
    pad = ~mask.reshape(-1).bool()
    for m in layers:
        index = rec.index[m.index][0]
        assert index[pad].eq(E).all()  # padding: no experts
        assert (index[~pad] < E).sum(-1).ge(1).all()  # real tokens keep k_base=1
        hist = h.stats.per_token[m.index]
        assert int(hist[0]) == int(pad.sum()) and int(hist.sum()) == n_tok


def test_padding_mask_from_inputs_embeds():
    model = build("qwen2_moe", router_std=1.0)
    batch = _left_padded()
    mask = batch["attention_mask"]
    n_real = int(mask.sum())
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with apply(model, make_plan(model, [1.5] * 4, "alloc-t"), stats=True) as h:
        with torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=mask)
    assert h.stats.computed_pairs() == {i: math.floor(n_real * 1.5) for i in range(4)}


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_with_fractional_alloc_t_and_padding(impl):
    """Prefill: floor(n_real * k) pairs; each decoding step routes B new (real) tokens: floor(B * k) pairs."""
    model = build("mixtral", impl=impl, router_std=1.0)
    batch = _left_padded()
    n_real, B = int(batch["attention_mask"].sum()), batch["input_ids"].shape[0]
    ks = [1.5, 1.0, 1.9, 1.25]
    with apply(model, make_plan(model, ks, "alloc-t"), stats=True) as h:
        with ExpertRowCounter(model) as counter:
            seq, _ = _generate(model, batch)
    steps = seq.shape[1] - batch["input_ids"].shape[1] - 1  # the last token is never fed back
    expected = {i: math.floor(n_real * k) + steps * math.floor(B * k) for i, k in enumerate(ks)}
    assert h.stats.computed_pairs() == expected
    assert counter.rows == expected
    assert_clean(model, 2)


def test_alloc_t_k_base_zero_lets_tokens_drop_every_expert():
    model = build("olmoe", k=3, router_std=1.0)
    ids = ids_of(2, 13)
    T = ids.numel()
    ks = [1.0, 1.5, 2.5, 3.0]
    with apply(model, make_plan(model, ks, "alloc-t", k_base=0), stats=True) as h:
        with ExpertRowCounter(model) as counter:
            out = logits(model, ids)
    expected = {i: math.floor(T * k) for i, k in enumerate(ks)}
    assert counter.rows == expected == h.stats.computed_pairs()
    assert out.isfinite().all()


def test_padding_all_real_mask_equals_no_mask():
    model = build("olmoe", router_std=1.0)
    ids = ids_of(2, 10)
    with apply(model, make_plan(model, [1.5] * 4, "alloc-t"), stats=True) as h:
        a = logits(model, ids)
        pa = h.stats.computed_pairs()
        h.stats.reset()
        b = logits(model, ids, attention_mask=torch.ones_like(ids))
        pb = h.stats.computed_pairs()
    assert torch.equal(a, b) and pa == pb == {i: 30 for i in range(4)}


# ----------------------------------------------------------------------------------- 6. plans that don't fit


@pytest.fixture(scope="module")
def deepseek():
    return build("deepseek_v2")


def _bad_plans():
    def wrong_layers(model):
        return Plan(model="t", moe_layers=[0, 1, 2], k_orig=2, budget=6, layer_method="uniform", k_per_layer=[2, 2, 2])

    def wrong_count(model):
        return Plan(model="t", moe_layers=[1, 2], k_orig=2, budget=4, layer_method="uniform", k_per_layer=[2, 2])

    def too_many(model):
        return Plan(model="t", moe_layers=[1, 2, 3, 4], k_orig=2, budget=8, layer_method="uniform", k_per_layer=[2] * 4)

    def wrong_k_orig(model):
        return Plan(model="t", moe_layers=[1, 2, 3], k_orig=3, budget=9, layer_method="uniform", k_per_layer=[3, 3, 3])

    def k_above_k_orig(model):
        p = Plan(model="t", moe_layers=[1, 2, 3], k_orig=2, budget=6, layer_method="uniform", k_per_layer=[1, 2, 2])
        p.k_per_layer = [3, 2, 1]  # bypass the schema: only the model check can catch it
        return p

    def k_above_k_orig_alloc_t(model):
        p = Plan(model="t", moe_layers=[1, 2, 3], k_orig=2, budget=6, layer_method="uniform",
                 k_per_layer=[1.5, 2.0, 2.0], token_allocation="alloc-t")
        p.k_per_layer = [2.5, 2.0, 1.0]
        return p

    def schema_dict(model):
        d = make_plan(model, [2, 2, 2]).to_dict()
        d["k_per_layer"] = [3, 2, 2]  # rejected by validation, before the model is looked at
        return d

    def missing_file(model):
        return "/nonexistent/plan.json"

    return [wrong_layers, wrong_count, too_many, wrong_k_orig, k_above_k_orig, k_above_k_orig_alloc_t, schema_dict,
            missing_file]


@pytest.mark.parametrize("bad", _bad_plans(), ids=lambda f: f.__name__)
def test_plan_that_does_not_fit_is_rejected_before_patching(deepseek, bad):
    model = deepseek
    calls = []
    pre = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(AllocMoeError) as e:
            apply(model, bad(model))
    finally:
        pre.remove()
    assert "\n" not in str(e.value)
    assert not calls  # no forward pass happened
    assert_clean(model, 2)
    apply(model, make_plan(model, [1, 2, 1])).remove()  # the model is still usable
    assert_clean(model, 2)


def test_layer_mismatch_message_names_layers(deepseek):
    with pytest.raises(AllocMoeError, match=r"1\.\.3"):
        apply(deepseek, Plan(model="t", moe_layers=[0, 1, 2], k_orig=2, budget=6, layer_method="uniform",
                             k_per_layer=[2, 2, 2]))


def test_apply_twice_is_rejected(deepseek):
    first = apply(deepseek, make_plan(deepseek, [1, 1, 2]))
    try:
        for plan in (make_plan(deepseek, [2, 2, 2]), None):
            with pytest.raises(AllocMoeError, match="already applied"):
                apply(deepseek, plan)
        # the first plan is untouched by the failed attempts
        assert [m.gate.top_k for m in moe_layers(deepseek)] == [1, 1, 2]
        assert [m.k_orig for m in moe_layers(deepseek)] == [2, 2, 2]
    finally:
        first.remove()
    assert_clean(deepseek, 2)


def test_unsupported_model_type():
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    llama = LlamaForCausalLM(cfg).eval()
    with pytest.raises(AllocMoeError, match="unsupported model type 'llama'"):
        apply(llama, None)
    with pytest.raises(AllocMoeError, match="unsupported"):
        apply(llama, Plan(model="t", moe_layers=[0, 1], k_orig=2, budget=4, layer_method="uniform", k_per_layer=[2, 2]))
    with pytest.raises(AllocMoeError):
        ExpertRowCounter(llama)
    assert not hasattr(llama, "_alloc_moe_applied")
    assert not llama.model._forward_pre_hooks


def test_architectures_registry_matches_zoo():
    assert set(ARCHITECTURES) == set(zoo.ZOO_SHAPES)


def test_plan_from_path_and_dict(tmp_path, deepseek):
    plan = make_plan(deepseek, [1, 2, 1])
    path = tmp_path / "plan.json"
    plan.save(path)
    for p in (str(path), path, plan.to_dict()):
        with apply(deepseek, p) as h:
            assert h.plan == plan
            assert [m.gate.top_k for m in moe_layers(deepseek)] == [1, 2, 1]
    assert_clean(deepseek, 2)


# ---------------------------------------------------------------------------------------- 7. routing stats


@pytest.fixture(scope="module")
def peaked_olmoe():
    return build("olmoe", router_std=1.0, impl="grouped_mm")


def test_routing_stats_invariants(peaked_olmoe):
    model = peaked_olmoe
    layers = moe_layers(model)
    E = layers[0].num_experts
    ids = ids_of(2, 24)
    T = ids.numel()
    with apply(model, make_plan(model, [1.5, 1.25, 2.0, 1.0], "alloc-t"), stats=RoutingStats(record_entropy=True)) as h:
        logits(model, ids)
        logits(model, ids[:1])
    st = h.stats
    pairs = st.computed_pairs()
    n_tok = T + ids.shape[1]
    for m in layers:
        assert int(st.loads[m.index].sum()) == pairs[m.index]
        assert st.loads[m.index].shape == (E,)
        hist = st.per_token[m.index]
        assert hist.shape == (3,) and int(hist.sum()) == n_tok == st.tokens[m.index]
        assert int((hist * torch.arange(3)).sum()) == pairs[m.index]
        ent = torch.cat(st.entropy[m.index])
        assert ent.shape == (n_tok,) and ent.min() >= 0 and ent.max() <= math.log(E) + 1e-5
    rows = st.summary()
    assert [r["layer"] for r in rows] == [m.index for m in layers]
    for r in rows:
        assert r["tokens"] == n_tok and r["computed_pairs"] == pairs[r["layer"]]
        assert r["activations_per_token"] == pytest.approx(pairs[r["layer"]] / n_tok)
        assert 0 <= r["mean_entropy"] <= math.log(E)
        assert r["max_load_over_mean"] >= 1.0
    assert pairs == {0: math.floor(T * 1.5) + math.floor(24 * 1.5), 1: math.floor(T * 1.25) + math.floor(24 * 1.25),
                     2: 2 * n_tok, 3: n_tok}
    st.reset()
    assert st.computed_pairs() == {} and st.record_entropy


def test_stats_only_apply_changes_nothing(peaked_olmoe):
    ids = ids_of(2, 16)
    ref = logits(peaked_olmoe, ids)
    with apply(peaked_olmoe, None, stats=True) as h:
        assert torch.equal(logits(peaked_olmoe, ids), ref)
    assert h.stats.computed_pairs() == {i: 2 * ids.numel() for i in range(4)}
    assert_clean(peaked_olmoe, 2)


def test_record_scores_save_load_and_threshold_plans(peaked_olmoe, tmp_path):
    model = peaked_olmoe
    layers = moe_layers(model)
    L, K = len(layers), layers[0].k_orig
    ids = ids_of(2, 128, seed=11)
    N = ids.numel()

    st = RoutingStats(record_scores=True)
    with apply(model, None, stats=st):
        logits(model, ids)
    scores = st.routing_scores()
    assert sorted(scores) == [m.index for m in layers]
    for m in layers:
        s = scores[m.index]
        assert s.shape == (N, K) and s.dtype == torch.float32
        assert (s[:, 0] >= s[:, 1]).all() and (s > 0).all() and (s.sum(-1) <= 1 + 1e-6).all()
    path = tmp_path / "scores.pt"
    st.save_routing_scores(path)
    loaded = load_routing_scores(path)
    assert loaded.keys() == scores.keys() and all(torch.equal(loaded[i], scores[i]) for i in scores)

    capped = RoutingStats(record_scores=True, max_scores_per_layer=100)
    with apply(model, None, stats=capped):
        logits(model, ids[:1])
        logits(model, ids[1:])
    assert all(v.shape == (100, K) for v in capped.routing_scores().values())

    with pytest.raises(AllocMoeError, match="record_scores"):
        RoutingStats().save_routing_scores(tmp_path / "none.pt")
    with pytest.raises(AllocMoeError, match="not found"):
        load_routing_scores(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(AllocMoeError):
        load_routing_scores(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(AllocMoeError, match="not an alloc-moe"):
        load_routing_scores(tmp_path / "other.pt")

    for mode in ("top-p", "naee"):
        plan = build_plan(method="uniform", budget=1.5 * L, moe_layers=[m.index for m in layers], k_orig=K,
                          token_allocation=mode, routing_scores=loaded)
        assert plan.k_per_layer == [1.5] * L and len(plan.thresholds) == L
        with apply(model, plan, stats=True) as h:
            with ExpertRowCounter(model) as counter:
                logits(model, ids)
        assert counter.rows == h.stats.computed_pairs()
        for r in h.stats.summary():
            assert r["activations_per_token"] == pytest.approx(1.5, rel=0.02), (mode, r)


# ------------------------------------------------------------------------------- 8. real topologies, tiny


@pytest.mark.parametrize("topology,n_layers,first,k_orig,experts", [
    ("deepseek-v2-lite", 26, 1, 6, 64),
    ("qwen1.5-moe-a2.7b", 24, 0, 4, 60),
    ("olmoe-1b-7b-0924", 16, 0, 8, 64),
])
def test_real_topologies_half_budget(topology, n_layers, first, k_orig, experts):
    model = zoo.make_model(topology=topology)
    layers = moe_layers(model)
    assert [m.index for m in layers] == list(range(first, first + n_layers))
    assert {m.k_orig for m in layers} == {k_orig} and {m.num_experts for m in layers} == {experts}
    plan = build_plan(method="uniform", budget=n_layers * k_orig / 2, moe_layers=[m.index for m in layers],
                      k_orig=k_orig)
    assert plan.k_per_layer == [k_orig // 2] * n_layers
    ids = ids_of(1, 8)
    with apply(model, plan, stats=True) as h:
        with ExpertRowCounter(model) as counter:
            logits(model, ids)
    expected = {m.index: 8 * (k_orig // 2) for m in layers}
    assert counter.rows == expected and h.stats.computed_pairs() == expected
    assert_clean(model, k_orig)


def test_drop_pairs_is_the_one_place_a_pair_is_dropped(monkeypatch):
    """The HF router hook drops pairs only through `alloc_moe.core.routing.drop_pairs` (the vLLM backend's test does the
    same on its side): replacing it changes what the experts compute, for every variable mode."""
    from alloc_moe.core import routing

    model = build("olmoe", router_std=1.0)
    ids = ids_of()
    K = moe_layers(model)[0].k_orig
    n = len(moe_layers(model))
    plans = {"alloc-t": make_plan(model, [K - 0.5] * n, "alloc-t"),
             "naee": make_plan(model, [float(K)] * n, "naee", thresholds=[0.2] * n)}
    seen = []

    def keep_first_slot(router_logits, weights, ids_, rule, *, sentinel, renormalize, token_mask=None, bounds=None):
        seen.append(rule.mode)
        slot0 = torch.zeros_like(ids_, dtype=torch.bool).scatter(1, weights.argmax(-1, keepdim=True), True)
        return torch.where(slot0, weights, 0.0), torch.where(slot0, ids_, sentinel)

    for mode, plan in plans.items():
        with apply(model, plan, stats=True) as h:
            real = logits(model, ids)
            real_pairs = sum(h.stats.computed_pairs().values())
        monkeypatch.setattr(routing, "drop_pairs", keep_first_slot)
        seen.clear()
        with apply(model, plan, stats=True) as h:
            replaced = logits(model, ids)
            assert sum(h.stats.computed_pairs().values()) == ids.numel() * n != real_pairs
        monkeypatch.undo()
        assert seen == [mode] * n and not torch.equal(real, replaced)
