"""Model zoo: random MoE models of five transformers architectures that load offline.

Tiny models are a few MB and run on CPU in tests; `width="full"` keeps the published widths of a real
topology (build it under `torch.device("meta")` to count parameters, or on a GPU for latency runs).
"""

import importlib.metadata
import importlib.resources
import json
import os
from pathlib import Path

from ..backends.dtypes import DTYPES

# transformers and tokenizers are imported where they are used: building the CLI parser imports this module
from ..errors import AllocMoeError
from ..io import atomic_dir

# Byte-level tokenizer: ids 0..255 are bytes, then the specials.
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
TOKENIZER_VOCAB = 259
TINY_VOCAB = 320  # TOKENIZER_VOCAB rounded up to a multiple of 64

_TINY_ATTN = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
# width="tiny" of a real topology: all layers and experts, so keep every expert very narrow
_SHRINK_ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4)
# width="small": the trainable embedded size, with shapes vLLM's CPU build accepts (head_dim 32; DeepSeek-V2's MLA
# needs kv_lora_rank + qk_rope_head_dim == 576 there). 16 routed experts, top-4, 9 decoder layers.
_SMALL_ATTN = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
_SMALL_MOE = dict(num_hidden_layers=9, num_experts_per_tok=4, norm_topk_prob=False)

# arch (the supported architectures: tests keep the keys equal to `backends.hf.model.ARCHITECTURES`) -> model_type,
# its generic tiny config ("tiny"), and what width="tiny" overrides in a published config ("shrink")
ZOO_SHAPES = {
    "deepseek_v2": {
        "model_type": "deepseek_v2",
        "tiny": dict(
            _TINY_ATTN, num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        ),
        "small": dict(
            _SMALL_ATTN, **_SMALL_MOE, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
            n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=32,
            qk_rope_head_dim=64, v_head_dim=32, topk_method="greedy", n_group=1, topk_group=1,
            routed_scaling_factor=1.0,
        ),
        "shrink": dict(
            _SHRINK_ATTN, intermediate_size=64, moe_intermediate_size=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        ),
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "tiny": dict(
            _TINY_ATTN, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=128,
            moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        "small": dict(
            _SMALL_ATTN, **_SMALL_MOE, intermediate_size=512, moe_intermediate_size=128,
            shared_expert_intermediate_size=128, num_experts=16,
        ),
        "shrink": dict(
            _SHRINK_ATTN, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=64,
        ),
    },
    "olmoe": {
        "model_type": "olmoe",
        # olmoe's intermediate_size is the per-expert width
        "tiny": dict(
            _TINY_ATTN, num_hidden_layers=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        "small": dict(_SMALL_ATTN, **_SMALL_MOE, intermediate_size=128, num_experts=16),
        "shrink": dict(_SHRINK_ATTN, intermediate_size=16),
    },
    "mixtral": {
        "model_type": "mixtral",
        "tiny": dict(
            _TINY_ATTN, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=32,
            num_local_experts=8, num_experts_per_tok=2,
        ),
        "small": dict(_SMALL_ATTN, **_SMALL_MOE, intermediate_size=128, num_local_experts=16),
        "shrink": dict(_SHRINK_ATTN, intermediate_size=16),
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "tiny": dict(
            _TINY_ATTN, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        ),
        "small": dict(
            _SMALL_ATTN, **{**_SMALL_MOE, "norm_topk_prob": True}, head_dim=32, intermediate_size=512,
            moe_intermediate_size=128, num_experts=16,
        ),
        "shrink": dict(_SHRINK_ATTN, head_dim=8, intermediate_size=64, moe_intermediate_size=16),
    },
}

TOPOLOGIES = {
    "deepseek-v2-lite": ("deepseek_v2", "deepseek-v2-lite.json"),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", "qwen1.5-moe-a2.7b.json"),
    "olmoe-1b-7b-0924": ("olmoe", "olmoe-1b-7b-0924.json"),
}

WIDTHS = ("tiny", "small", "full")


def _choose(kind: str, value, allowed) -> None:
    if value not in allowed:
        raise AllocMoeError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


def _resolve_arch(arch: str | None, topology: str | None) -> str:
    if topology is not None:
        _choose("topology", topology, TOPOLOGIES)
        topo_arch = TOPOLOGIES[topology][0]
        if arch is not None and arch != topo_arch:
            raise AllocMoeError(f"topology {topology!r} is arch {topo_arch!r}, not {arch!r}")
        return topo_arch
    if arch is None:
        raise AllocMoeError(f"give an arch ({', '.join(ZOO_SHAPES)}) or a topology ({', '.join(TOPOLOGIES)})")
    _choose("arch", arch, ZOO_SHAPES)
    return arch


def config_dict(
    arch: str | None,
    *,
    topology: str | None = None,
    layers: int | None = None,
    width: str = "tiny",
    vocab_size: int | None = None,
) -> tuple[str, dict]:
    """(model_type, config fields) of `make_config`, without transformers: what the workflow reads at its start."""
    arch = _resolve_arch(arch, topology)
    _choose("width", width, WIDTHS)
    spec = ZOO_SHAPES[arch]
    if topology is None:
        if width == "full":
            raise AllocMoeError("width 'full' needs a topology; allowed: " + ", ".join(TOPOLOGIES))
        d = dict(spec[width])
    else:
        if width == "small":
            raise AllocMoeError("width 'small' is a generic arch size; give --arch instead of --topology")
        path = importlib.resources.files("alloc_moe.data") / "configs" / TOPOLOGIES[topology][1]
        d = json.loads(path.read_text(encoding="utf-8"))
        d.pop("torch_dtype", None)  # make_model decides the dtype
        if width == "tiny":
            d.update(spec["shrink"])
    dense = d.get("first_k_dense_replace", 0)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers <= dense:
            raise AllocMoeError(f"layers must be an integer >= {dense + 1} for {arch}, got {layers!r}")
        d["num_hidden_layers"] = layers
    if vocab_size is None and width != "full":
        vocab_size = TINY_VOCAB
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < TOKENIZER_VOCAB:
            raise AllocMoeError(f"vocab_size must be an integer >= {TOKENIZER_VOCAB}, got {vocab_size!r}")
        d["vocab_size"] = vocab_size
    # The zoo tokenizer's ids, whatever the published model used.
    d.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    d.pop("model_type", None)
    return spec["model_type"], d


def make_config(
    arch: str | None,
    *,
    topology: str | None = None,
    layers: int | None = None,
    width: str = "tiny",
    vocab_size: int | None = None,
) -> "PretrainedConfig":  # noqa: F821
    """Config of a generic tiny or small MoE of `arch`, or of a published `topology` at tiny or full width."""
    from transformers import AutoConfig

    model_type, d = config_dict(arch, topology=topology, layers=layers, width=width, vocab_size=vocab_size)
    return AutoConfig.for_model(model_type, **d)


def num_moe_layers(arch: str | None, *, topology: str | None = None, layers: int | None = None,
                   width: str = "tiny") -> int:
    """Sparse MoE layers of the config `make_config` builds (decoder layers less DeepSeek's leading dense ones)."""
    _, d = config_dict(arch, topology=topology, layers=layers, width=width)
    return d["num_hidden_layers"] - d.get("first_k_dense_replace", 0)


def _bytes_to_unicode() -> dict[str, int]:
    # GPT-2's printable stand-ins for the 256 byte values (what ByteLevel maps bytes to)
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_VOCAB = _bytes_to_unicode()


def make_tokenizer(padding_side: str = "left"):
    """Offline byte-level tokenizer: 256 byte tokens (no merges) + <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _choose("padding_side", padding_side, ("left", "right"))
    tok = Tokenizer(models.BPE(vocab=dict(_BYTE_VOCAB), merges=[]))  # id == byte value
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side=padding_side,
        clean_up_tokenization_spaces=False, model_max_length=2048,
        split_special_tokens=True,  # "</s>" inside text is text, so every string round-trips byte for byte
    )


def make_model(
    arch: str | None = None,
    *,
    topology: str | None = None,
    layers: int | None = None,
    width: str = "tiny",
    seed: int = 0,
    router_std: float | None = None,
    dtype: "torch.dtype | None" = None,  # noqa: F821 - None: float32
    experts_implementation: str | None = None,
    overrides: dict | None = None,
):
    """Randomly initialised causal LM; same arguments -> bitwise-identical weights.

    `overrides` sets config fields after the arch/topology defaults (e.g. {"num_experts_per_tok": 3}).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..backends.hf.model import moe_layers

    if router_std is not None and not (router_std > 0):
        raise AllocMoeError(f"router_std must be > 0, got {router_std!r}")
    config = make_config(arch, topology=topology, layers=layers, width=width)
    for name, value in (overrides or {}).items():
        setattr(config, name, value)
    kwargs = {"dtype": torch.float32 if dtype is None else dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with torch.random.fork_rng():  # leave the caller's RNG alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if router_std is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in moe_layers(model):
                w = m.gate.weight
                if not w.is_meta:
                    w.copy_(torch.randn(w.shape, generator=gen, device="cpu") * router_std)
    return model.eval()


def _version() -> str:
    try:
        return importlib.metadata.version("alloc-moe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_model(out_dir: str | os.PathLike, *, overwrite: bool = False, **make_model_kwargs):
    """make_model + make_tokenizer saved to `out_dir` (safetensors), all or nothing; returns the model."""
    import torch

    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise AllocMoeError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    model = make_model(**make_model_kwargs)
    meta = {
        "arch": model.config.model_type,
        "topology": make_model_kwargs.get("topology"),
        "layers": model.config.num_hidden_layers,
        "width": make_model_kwargs.get("width", "tiny"),
        "seed": make_model_kwargs.get("seed", 0),
        "router_std": make_model_kwargs.get("router_std"),
        "dtype": str(make_model_kwargs.get("dtype") or torch.float32).removeprefix("torch."),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "moe_layers": moe_layer_indices(model),
        "num_experts": num_experts(model),
        "k_orig": k_orig(model),
        "alloc_moe_version": _version(),
        "transformers_version": importlib.metadata.version("transformers"),
        "torch_version": torch.__version__,
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        make_tokenizer().save_pretrained(tmp)
        (tmp / "alloc_moe_zoo.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return model


def moe_layer_indices(model) -> list[int]:
    """Decoder-layer indices of the sparse MoE blocks (see `backends.hf.model.moe_layers`)."""
    from ..backends.hf.model import moe_layers

    return [m.index for m in moe_layers(model)]


def k_orig(model) -> int:
    """The model's own top-k (the same in every MoE layer)."""
    from ..backends.hf.model import moe_layers

    ks = {m.k_orig for m in moe_layers(model)}
    if len(ks) != 1:
        raise AllocMoeError(f"MoE layers disagree on top-k: {sorted(ks)}")
    return ks.pop()


def num_experts(model) -> int:
    """Routed experts per MoE layer (the same in every MoE layer)."""
    from ..backends.hf.model import moe_layers

    ns = {m.num_experts for m in moe_layers(model)}
    if len(ns) != 1:
        raise AllocMoeError(f"MoE layers disagree on the number of experts: {sorted(ns)}")
    return ns.pop()


def register_cli(subparsers) -> None:
    """Add `make-model` to an argparse subparsers object."""
    p = subparsers.add_parser("make-model", help="write a random MoE model + tokenizer that load offline")
    p.add_argument("--arch", choices=list(ZOO_SHAPES), help="derived from --topology when omitted")
    p.add_argument("--topology", choices=list(TOPOLOGIES))
    p.add_argument("--layers", type=int)
    p.add_argument("--width", choices=WIDTHS, default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router-std", type=float, help="re-initialise routers with N(0, X) for peaked routing")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_make_model)


def _cmd_make_model(args) -> int:
    import torch

    model = write_model(
        args.out, overwrite=args.overwrite, arch=args.arch, topology=args.topology, layers=args.layers,
        width=args.width, seed=args.seed, router_std=args.router_std, dtype=getattr(torch, args.dtype),
    )
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}: {model.config.model_type}, {n / 1e6:.2f}M params, "
        f"{len(moe_layer_indices(model))}/{model.config.num_hidden_layers} MoE layers, "
        f"{num_experts(model)} experts, top-{k_orig(model)}"
    )
    return 0
