"""Shared helpers of the vLLM backend tests: zoo checkpoints, prompts, HF references, vLLM prompt logprobs."""

import torch

from alloc_moe import Plan
from alloc_moe.backends.hf.apply import apply
from alloc_moe.data import zoo

PROMPT_LENGTHS = (29, 17, 40)
# Tolerance for vLLM vs HF (fp32, same plan, same checkpoint): different kernels sum in different orders.
# Measured max gap, every mode: 9.5e-7 on olmoe, 4.8e-7 on deepseek_v2 (printed by test_parity_with_hf with -s).
LOGPROB_TOL = 1e-5


def write_zoo(path, arch: str) -> str:
    """3 MoE layers (DeepSeek-V2 gets its dense layer 0 in front: MoE layers 1..3)."""
    layers = 4 if arch == "deepseek_v2" else 3
    zoo.write_model(path, arch=arch, width="small", layers=layers, router_std=1.0, seed=0)
    return str(path)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def plan_for(model_dir: str, mode: str, ks: list[float], thresholds=None, k_base: int = 1) -> Plan:
    meta = zoo_meta(model_dir)
    return Plan(model=model_dir, moe_layers=meta["moe_layers"], k_orig=meta["k_orig"], budget=float(sum(ks)),
                layer_method="uniform", k_per_layer=list(ks), token_allocation=mode, k_base=k_base,
                thresholds=thresholds)


def zoo_meta(model_dir: str) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(model_dir) / "alloc_moe_zoo.json").read_text())


def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager").eval()


def hf_prompt_logprobs(model, ids: list[int], plan: Plan | None, stats: bool = False):
    """log p(token_i | tokens_<i) for i >= 1, one sequence per forward; with `stats`, also computed pairs."""
    x = torch.tensor([ids], device=model.device)
    with apply(model, plan, stats=stats or None) as handle, torch.no_grad():
        logits = model(input_ids=x).logits[0].float().cpu()  # [S, V]
        pairs = handle.stats.computed_pairs() if stats else None
    x = x.cpu()
    lp = logits.log_softmax(-1)[:-1].gather(1, x[0, 1:, None])[:, 0]  # [S-1]
    return (lp, pairs) if stats else lp


def hf_greedy(model, ids: list[int], plan: Plan | None, n: int) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    with apply(model, plan), torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=zoo.PAD_ID, eos_token_id=None)
    return out[0, len(ids):].tolist()


def vllm_run(llm, batch: list[list[int]], max_tokens: int = 1):
    """One generate call (all of `batch` may share engine steps): (prompt logprobs [S-1], greedy token ids)."""
    from vllm import SamplingParams, TokensPrompt

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], sp, use_tqdm=False)
    res = []
    for ids, o in zip(batch, outs):
        lp = torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], ids[1:])])
        res.append((lp, list(o.outputs[0].token_ids)))
    return res


def vllm_one_by_one(llm, batch: list[list[int]], max_tokens: int = 1):
    """Each prompt alone in the engine (batch composition controlled: a step holds one sequence)."""
    return [vllm_run(llm, [ids], max_tokens)[0] for ids in batch]
