"""vLLM's real Triton MoE path with dropped pairs, checked against a dense reference, on any machine.

Our CUDA path hands vLLM's `TritonExperts` routing tensors of the router's shape [T, K_orig] in which dropped pairs
have expert id -1 and weight 0 (`routing.DROPPED_ID`). Three things must then hold: the align step skips them, the
Triton GEMM writes nothing (or zeros) for them, and the final reduction does not add their rows. This module runs
the installed vLLM's own `TritonExperts.apply` (our `experts._patch_triton` applied) and compares it with a dense
reference over the kept pairs only, with every workspace pre-filled with NaN so that a row that is summed without
having been written shows up as NaN.

It runs on a GPU as it is, and on a CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is
imported; see `enable_interpreter`). vLLM's CUDA-only custom ops have no CPU kernel; `torch_ops()` gives torch
functions of the same semantics (tested against hand-made cases in tests/test_kernel_check.py):

- `moe_align_block_size`: pairs sorted by expert, each expert's rows padded to a multiple of `block_size` with the
  sentinel `topk_ids.numel()`, ids < 0 skipped (as the CUDA kernel's `get_local_expert_id` does);
- `moe_sum`: sum over the K slots, pad-aware (slots with id < 0, or mapped to -1 by `expert_map`, skipped) if and
  only if `topk_ids` is given;
- `silu_and_mul`: silu(x[:, :d]) * x[:, d:], registered only where the build lacks it.

vLLM's two routing paths are both covered: the aligned one, and the small-batch one (T*K*4 <= E: no align step,
`topk_ids` go straight to the kernel, which writes zeros for id -1 blocks).

Run as `python -m alloc_moe.vllm_backend.kernel_check` (prints one JSON line per case; exit 1 on a failed case).
`--variant` runs the negative controls: `unpatched` (vLLM's experts without our patch: its reduction sums every slot)
and `reduction-without-topk-ids` (an experts class whose `apply` calls `moe_sum` without `topk_ids`, as vLLM 0.26.0
does; our patch refuses it, so the run forces the patch in to show what the refusal prevents).
"""

import contextlib
import dataclasses
import json
import math
import os
import sys

import torch


# ---- torch stand-ins for vLLM's CUDA MoE ops ---------------------------------------------------------------------
def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int, sorted_token_ids: torch.Tensor,
                         experts_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                         expert_map: torch.Tensor | None = None, scatter_idx: torch.Tensor | None = None) -> None:
    """`vllm._custom_ops.moe_align_block_size` in torch (same arguments, fills the three outputs in place).

    topk_ids [T, K]; sorted_token_ids [max_padded] <- flat pair indices grouped by expert, each group padded to a
    multiple of block_size with T*K; experts_ids [max_blocks] <- the expert of each block (-1 past the end);
    num_tokens_post_pad [1] <- the padded total. Pairs with id < 0 (or, with expert_map, a local id < 0) are skipped.
    """
    if scatter_idx is not None:
        raise NotImplementedError("scatter_idx is not used by the unquantized Triton experts")
    flat = topk_ids.reshape(-1).long()  # [T*K]
    numel = flat.numel()
    local = flat if expert_map is None else torch.where(flat >= 0, expert_map[flat.clamp(min=0)].long(), flat)
    valid = (local >= 0) & (local < num_experts)  # [T*K]
    counts = torch.bincount(local[valid], minlength=num_experts)  # [E]
    padded = (counts + block_size - 1) // block_size * block_size  # [E]
    starts = torch.cumsum(padded, 0) - padded  # [E]
    sorted_token_ids.fill_(numel)
    experts_ids.fill_(-1)
    order = torch.argsort(torch.where(valid, local, num_experts), stable=True)[: int(valid.sum())]  # kept, by expert
    e_of = local[order]  # [P]
    rank = torch.arange(order.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[e_of]  # [P]
    sorted_token_ids[starts[e_of] + rank] = order.to(sorted_token_ids.dtype)
    for e in torch.nonzero(padded).flatten().tolist():
        b0 = int(starts[e]) // block_size
        experts_ids[b0: b0 + int(padded[e]) // block_size] = e
    num_tokens_post_pad.fill_(int(padded.sum()))


def moe_sum(input: torch.Tensor, output: torch.Tensor, topk_ids: torch.Tensor | None = None,
            expert_map: torch.Tensor | None = None) -> None:
    """`vllm._custom_ops.moe_sum` in torch: output [T, H] <- sum over slots of input [T, K, H]; with `topk_ids`,
    slots whose id is < 0 (or whose `expert_map` entry is < 0) are skipped, never read."""
    if topk_ids is None:
        output.copy_(input.sum(dim=1))
        return
    keep = topk_ids >= 0  # [T, K]
    if expert_map is not None:
        keep = keep & (expert_map[topk_ids.clamp(min=0).long()] >= 0)
    zero = torch.zeros((), dtype=input.dtype, device=input.device)
    output.copy_(torch.where(keep[..., None], input, zero).sum(dim=1))  # where, not *: NaN rows must not leak


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    d = x.shape[-1] // 2
    out.copy_(torch.nn.functional.silu(x[..., :d]) * x[..., d:])


def _register_silu_and_mul() -> None:
    """Give `torch.ops._C.silu_and_mul` a torch implementation where the installed build has none."""
    try:
        torch.ops._C.silu_and_mul  # noqa: B018
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("silu_and_mul(Tensor(a!) out, Tensor input) -> ()")
    lib.impl("silu_and_mul", silu_and_mul, "CompositeExplicitAutograd")
    _register_silu_and_mul.lib = lib  # keep the registration alive


@contextlib.contextmanager
def torch_ops():
    """Route vLLM's `ops.moe_align_block_size` and `ops.moe_sum` to the torch versions for the block."""
    from vllm import _custom_ops as ops

    saved = ops.moe_align_block_size, ops.moe_sum
    ops.moe_align_block_size, ops.moe_sum = moe_align_block_size, moe_sum
    _register_silu_and_mul()
    try:
        yield
    finally:
        ops.moe_align_block_size, ops.moe_sum = saved


# ---- Triton under the interpreter -------------------------------------------------------------------------------
def enable_interpreter() -> None:
    """Make vLLM's Triton kernels run on CPU tensors: `TRITON_INTERPRET=1` before Triton is imported, and the real
    Triton in `vllm.triton_utils` (the CPU build hands out placeholders) before any fused_moe module is imported."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set; run in a fresh process")
    os.environ["TRITON_INTERPRET"] = "1"
    stale = [m for m in sys.modules if m.startswith("vllm.model_executor.layers.fused_moe")]
    if stale:
        raise RuntimeError(f"{stale[0]} was imported before the real Triton was installed; run in a fresh process")
    import triton
    import triton.language as tl

    import vllm.triton_utils as tu

    tu.HAS_TRITON, tu.triton, tu.tl = True, triton, tl
    _device_name_stand_in()


def _device_name_stand_in() -> None:
    """The kernel config look-up names the device; a CPU platform (or a CUDA build without a GPU) cannot."""
    from vllm.platforms import current_platform

    try:
        current_platform.get_device_name(0)
    except Exception:  # noqa: BLE001 - any failure means: no device name here
        type(current_platform).get_device_name = classmethod(lambda cls, device_id=0: "cpu-interpreter")


# ---- one case -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: int  # T
    experts: int  # E
    top_k: int  # K (the router's K_orig: the slots keep this shape)
    hidden: int  # H
    inter: int  # I (w1 is [E, 2I, H], w2 is [E, H, I])
    dtype: torch.dtype
    drop: float = 0.5  # share of pairs dropped (id -1, weight 0)
    seed: int = 0

    @property
    def small_batch(self) -> bool:
        """vLLM skips the align step (and `topk_ids` reach the kernel) when T*K*4 <= E."""
        return self.tokens * self.top_k * 4 <= self.experts


CASES = [
    Case("aligned-fp32", 48, 8, 4, 64, 32, torch.float32),
    Case("aligned-fp16", 48, 8, 4, 64, 32, torch.float16),
    Case("aligned-bf16", 48, 8, 4, 64, 32, torch.bfloat16),
    Case("small-batch-fp32", 2, 64, 4, 64, 32, torch.float32),
    Case("small-batch-fp16", 2, 64, 4, 64, 32, torch.float16),
    Case("aligned-nothing-dropped-fp32", 16, 8, 2, 64, 32, torch.float32, drop=0.0),
    Case("aligned-row-all-dropped-fp32", 16, 8, 2, 64, 32, torch.float32, drop=1.0),
]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # max |diff| / max |ref|


def make_inputs(case: Case, device: str = "cpu"):
    """hidden [T, H], w1 [E, 2I, H], w2 [E, H, I], topk_weights [T, K] (0 where dropped), topk_ids [T, K] (-1 where
    dropped; each token's ids distinct, as a router's)."""
    g = torch.Generator().manual_seed(case.seed)
    T, E, K, H, I = case.tokens, case.experts, case.top_k, case.hidden, case.inter
    hidden = torch.randn(T, H, generator=g) / math.sqrt(H)
    w1 = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    w2 = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].to(torch.int32)  # [T, K] distinct per token
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    drop = torch.rand(T, K, generator=g) < case.drop  # [T, K]
    if 0 < case.drop < 1:
        drop[0] = False  # at least one untouched token and one token with a drop
        drop[1, 0] = True
    ids = torch.where(drop, torch.full_like(ids, -1), ids)
    weights = torch.where(drop, torch.zeros_like(weights), weights)
    to = dict(device=device)
    return (hidden.to(case.dtype).to(**to), w1.to(case.dtype).to(**to), w2.to(case.dtype).to(**to),
            weights.to(torch.float32).to(**to), ids.to(**to))


def dense_reference(hidden, w1, w2, topk_weights, topk_ids) -> torch.Tensor:
    """[T, H] in float64: sum over kept pairs (id >= 0) of weight * w2_e @ (silu(gate) * up)(w1_e @ x)."""
    h, W1, W2 = hidden.double(), w1.double(), w2.double()
    out = torch.zeros_like(h)
    inter = W1.shape[1] // 2
    for t, k in (topk_ids >= 0).nonzero().tolist():
        e = int(topk_ids[t, k])
        gu = W1[e] @ h[t]  # [2I]
        act = torch.nn.functional.silu(gu[:inter]) * gu[inter:]  # [I]
        out[t] += float(topk_weights[t, k]) * (W2[e] @ act)
    return out


VARIANTS = ("patched", "unpatched", "reduction-without-topk-ids")


def reduction_without_topk_ids_class(tmp_dir: str):
    """A `TritonExperts` subclass whose `apply` is the installed one with its final reduction called as vLLM 0.26.0
    calls it, `self.moe_sum(intermediate_cache3, output)`. Its source is written to `tmp_dir` so that
    `inspect.getsource` (the start-up check) reads it like any installed code."""
    import inspect
    import textwrap
    from pathlib import Path

    from vllm.model_executor.layers.fused_moe.experts import triton_moe

    src = textwrap.dedent(inspect.getsource(triton_moe.TritonExperts.apply))
    call = "self.moe_sum(intermediate_cache3, output, topk_ids, expert_map)"
    if call not in src:
        raise RuntimeError(f"the installed TritonExperts.apply has no `{call}` to rewrite")
    path = Path(tmp_dir) / "triton_experts_v026_reduction.py"
    path.write_text(src.replace(call, "self.moe_sum(intermediate_cache3, output)"), encoding="utf-8")
    ns = dict(vars(triton_moe))
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), ns)  # noqa: S102 - vLLM's own code, rewritten
    return type("TritonExpertsV026Reduction", (triton_moe.TritonExperts,), {"apply": ns["apply"]})


def triton_experts(case: Case, variant: str = "patched", tmp_dir: str | None = None):
    """A vLLM `TritonExperts` for an unquantized layer of `case`'s shape, with our dropped-pairs patch (`variant`:
    see VARIANTS)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG, FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from .experts import _patch_triton

    cfg = FusedMoEConfig(num_experts=case.experts, experts_per_token=case.top_k, hidden_dim=case.hidden,
                         intermediate_size=case.inter, num_local_experts=case.experts,
                         num_logical_experts=case.experts, activation=MoEActivation.SILU, device="cpu",
                         routing_method=RoutingMethodType.Default,
                         moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=case.dtype)
    cls = TritonExperts
    if variant == "reduction-without-topk-ids":
        import tempfile

        cls = reduction_without_topk_ids_class(tmp_dir or tempfile.mkdtemp(prefix="alloc_moe_v026."))
    fe = cls(cfg, FUSED_MOE_UNQUANTIZED_CONFIG)
    if variant == "patched":
        _patch_triton(fe)
    elif variant == "reduction-without-topk-ids":
        from .experts import AllocMoeError

        try:
            _patch_triton(fe)
        except AllocMoeError:  # the refusal this variant exists to trigger; force the moe_sum patch in anyway
            pass
        else:
            raise RuntimeError("the start-up check did not refuse a reduction without topk_ids")
        _force_moe_sum_patch(fe)
    return fe


def _force_moe_sum_patch(fe) -> None:
    import types

    def moe_sum(self, input, output, topk_ids=None, expert_map=None):  # what experts._patch_triton installs
        from vllm import _custom_ops as ops

        ops.moe_sum(input, output, topk_ids, expert_map) if topk_ids is not None else ops.moe_sum(input, output)

    fe.moe_sum = types.MethodType(moe_sum, fe)


def run_apply(fe, case: Case, inputs) -> torch.Tensor:
    """vLLM's `TritonExperts.apply` on `inputs`, with NaN-filled workspaces and output; returns output [T, H]."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    hidden, w1, w2, weights, ids = inputs
    T, H, K = hidden.shape[0], hidden.shape[1], ids.shape[1]
    N = w1.shape[1]
    ws13, ws2, out_shape = fe.workspace_shapes(T, N, H, K, case.experts, case.experts, None, MoEActivation.SILU)
    nan = dict(dtype=hidden.dtype, device=hidden.device)
    ws13 = torch.full((math.prod(ws13),), float("nan"), **nan)
    ws2 = torch.full((math.prod(ws2),), float("nan"), **nan)
    output = torch.full(out_shape, float("nan"), **nan)
    fe.apply(output, hidden, w1, w2, weights, ids, MoEActivation.SILU, case.experts, None, None, None, ws13, ws2,
             None, False)
    return output


def check_case(case: Case, device: str = "cpu", variant: str = "patched") -> dict:
    """Run `case` through vLLM's Triton experts (`variant`) and compare with `dense_reference`."""
    inputs = make_inputs(case, device)
    hidden, w1, w2, weights, ids = inputs
    if case.dtype == torch.bfloat16 and device == "cpu":
        # Triton's interpreter multiplies bf16 `tl.dot` operands as raw uint16 bits (triton-lang/triton#11584):
        # the CPU run upcasts the operands (exact: bf16 -> fp32 loses nothing) and keeps bf16's tolerance.
        inputs = (hidden.float(), w1.float(), w2.float(), weights, ids)
    fe = triton_experts(dataclasses.replace(case, dtype=inputs[0].dtype), variant)
    with torch_ops():
        got = run_apply(fe, case, inputs).double().cpu()
    ref = dense_reference(hidden.cpu(), w1.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    scale = float(ref.abs().max()) or 1.0
    err = float((got - ref).abs().max()) / scale if not torch.isnan(got).any() else float("nan")
    ok = math.isfinite(err) and err <= TOL[case.dtype]
    return {"case": case.name, "variant": variant, "path": "small-batch" if case.small_batch else "aligned", "dtype": str(case.dtype),
            "tokens": case.tokens, "experts": case.experts, "top_k": case.top_k,
            "dropped_pairs": int((ids < 0).sum()), "pairs": ids.numel(), "nan_rows": int(torch.isnan(got).any(1).sum()),
            "rel_max_err": err, "tol": TOL[case.dtype], "ok": ok}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(c.name for c in CASES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", default="patched", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    variants = args.variant.split(",")
    names = {c.name: c for c in CASES}
    bad = [v for v in variants if v not in VARIANTS] + [c for c in args.cases.split(",") if c not in names]
    if bad:
        p.error(f"unknown variant or case {bad[0]!r}; variants: {', '.join(VARIANTS)}; cases: {', '.join(names)}")
    if args.device == "cpu":
        enable_interpreter()
    ok = True
    for variant in variants:
        for name in args.cases.split(","):
            res = check_case(names[name], args.device, variant)
            ok &= res["ok"]
            print(json.dumps(res), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
