"""Latency twin of a model: same architecture, layers, dense first layers, routed and shared experts, top-k and
vocabulary, at a realistic width with random weights (`alloc-moe make-twin`).

Why: the embedded model (hidden 128, experts 128 wide) is so narrow that per-operator overhead, not the expert GEMMs,
sets its step time on CPU, so its measured speedups are noise. A plan is per-layer K and token-allocation settings
(it depends on the MoE layers and K_orig only), and its compute is set by its budget, not by the weights, so it
applies unchanged to a twin where expert compute is the share of a step it has in a published MoE; the latency rule
times the twin (`latency.model: twin`). Nothing else reads the twin: accuracy, perplexity and load balance are the
trained model's.

Default width: hidden 512 and expert width = hidden. OLMoE-1B-7B activates 8 experts of width 1024 at hidden 2048,
i.e. 4 x hidden of expert width per token next to attention's 4 hidden^2 projections; with the embedded top-4 the
same ratio of expert to attention FLOPs needs expert width = hidden. 512 (110M parameters for the embedded topology,
not 2048) keeps the latency job of the embedded default within the main job's time on 2 CPU cores; at this width
the measured expert share of a decode step is ~0.75 (docs/workflow.md, latency).
"""

import copy
import importlib.metadata
import json
import os
from pathlib import Path

import torch

from ..errors import AllocMoeError
from ..io import atomic_dir
from . import zoo

# the config field of the routed experts' width (olmoe and mixtral call it intermediate_size)
EXPERT_WIDTH_FIELD = {"deepseek_v2": "moe_intermediate_size", "qwen2_moe": "moe_intermediate_size",
                      "olmoe": "intermediate_size", "mixtral": "intermediate_size", "qwen3_moe": "moe_intermediate_size"}
_SCALES_WITH_EXPERT = ("intermediate_size", "shared_expert_intermediate_size")  # dense layers, shared experts
HEAD_DIM = 64
HIDDEN, EXPERT = 512, 512


def _positive(name, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise AllocMoeError(f"{name} must be a positive integer, got {v!r}")


def twin_config(config, *, hidden_size: int = HIDDEN, expert_size: int = EXPERT):
    """`config` (a transformers MoE config) at hidden size `hidden_size` and routed-expert width `expert_size`.
    Kept: architecture, layers, dense first layers, experts (routed, shared), top-k, routing settings, vocabulary.
    Dense-layer and shared-expert widths scale by expert_size / the old expert width; attention keeps its kind (GQA
    group size; DeepSeek-V2's MLA ranks) with heads of HEAD_DIM."""
    arch = config.model_type
    if arch not in EXPERT_WIDTH_FIELD:
        raise AllocMoeError(f"no latency twin for model type {arch!r}; allowed: {', '.join(EXPERT_WIDTH_FIELD)}")
    _positive("hidden_size", hidden_size)
    _positive("expert_size", expert_size)
    if hidden_size % HEAD_DIM:
        raise AllocMoeError(f"hidden_size must be a multiple of {HEAD_DIM}, got {hidden_size}")
    c = copy.deepcopy(config)
    field = EXPERT_WIDTH_FIELD[arch]
    scale = expert_size / getattr(config, field)
    for name in _SCALES_WITH_EXPERT:
        if name != field and getattr(config, name, None):
            setattr(c, name, max(1, round(getattr(config, name) * scale)))
    setattr(c, field, expert_size)
    heads = hidden_size // HEAD_DIM
    group = max(1, config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    c.hidden_size, c.num_attention_heads, c.num_key_value_heads = hidden_size, heads, max(1, heads // group)
    if getattr(config, "head_dim", None) is not None and arch != "deepseek_v2":
        c.head_dim = HEAD_DIM
    return c


def make_twin(config, *, hidden_size: int = HIDDEN, expert_size: int = EXPERT, seed: int = 0):
    """The twin model of `config` (float32, eval mode); same arguments -> bitwise-identical weights."""
    from transformers import AutoModelForCausalLM

    twin = twin_config(config, hidden_size=hidden_size, expert_size=expert_size)
    with torch.random.fork_rng():  # leave the caller's RNG alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(twin, dtype=torch.float32)
    return model.eval()


def write_twin(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, hidden_size: int = HIDDEN,
               expert_size: int = EXPERT, seed: int = 0, overwrite: bool = False):
    """The twin of the model in `model_dir` (only its config.json is read) with the zoo tokenizer, saved to
    `out_dir` (safetensors, all or nothing) with `alloc_moe_twin.json`; returns the model."""
    from transformers import AutoConfig

    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise AllocMoeError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    model = make_twin(AutoConfig.from_pretrained(model_dir), hidden_size=hidden_size, expert_size=expert_size,
                      seed=seed)
    meta = {
        "twin_of": str(model_dir), "arch": model.config.model_type, "layers": model.config.num_hidden_layers,
        "hidden_size": hidden_size, "expert_size": expert_size, "seed": seed, "dtype": "float32",
        "num_parameters": sum(p.numel() for p in model.parameters()), "moe_layers": zoo.moe_layer_indices(model),
        "num_experts": zoo.num_experts(model), "k_orig": zoo.k_orig(model),
        "transformers_version": importlib.metadata.version("transformers"), "torch_version": torch.__version__,
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        zoo.make_tokenizer().save_pretrained(tmp)
        (tmp / "alloc_moe_twin.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return model


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("make-twin", help="write a model's latency twin: its topology at a realistic width",
                              description="The latency twin of a model: same architecture, layers, experts and "
                                          "top-k at --hidden-size / --expert-size, random weights from --seed.")
    p.add_argument("--model", required=True, help="model directory (only its config.json is read)")
    p.add_argument("--hidden-size", type=int, default=HIDDEN, help=f"default {HIDDEN}")
    p.add_argument("--expert-size", type=int, default=EXPERT, help=f"routed-expert width (default {EXPERT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_make_twin)


def _cmd_make_twin(args) -> int:
    model = write_twin(args.model, args.out, hidden_size=args.hidden_size, expert_size=args.expert_size,
                       seed=args.seed, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: twin of {args.model}, {model.config.model_type}, {n / 1e6:.2f}M params, "
          f"{len(zoo.moe_layer_indices(model))}/{model.config.num_hidden_layers} MoE layers, "
          f"{zoo.num_experts(model)} experts, top-{zoo.k_orig(model)}")
    return 0
