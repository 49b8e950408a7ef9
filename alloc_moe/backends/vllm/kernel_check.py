"""vLLM's real Triton MoE path with dropped pairs, checked against a dense reference, on any machine.

Our CUDA path hands vLLM's `TritonExperts` routing tensors of the router's shape [T, K_orig] in which dropped pairs
have expert id -1 and weight 0 (`routing.DROPPED_ID`). Three things must then hold: the align step skips them, the
Triton GEMM writes nothing (or zeros) for them, and the final reduction does not add their rows. This module runs
the installed vLLM's own `TritonExperts.apply` (our `experts._patch_triton` applied) and compares it with a dense
reference over the kept pairs only, with every workspace pre-filled with NaN so that a row that is summed without
having been written shows up as NaN.

It runs on a GPU as it is, and on a CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is
imported; see `enable_interpreter`). vLLM's CUDA-only custom ops have no CPU kernel; `torch_ops()` gives torch
functions of the same semantics (tested against hand-made cases in tests/backends/test_kernel_check.py):

- `moe_align_block_size`: pairs sorted by expert, each expert's rows padded to a multiple of `block_size` with the
  sentinel `topk_ids.numel()`, ids < 0 skipped (as the CUDA kernel's `get_local_expert_id` does);
- `moe_sum`: sum over the K slots, pad-aware (slots with id < 0, or mapped to -1 by `expert_map`, skipped) if and
  only if `topk_ids` is given;
- `silu_and_mul`: silu(x[:, :d]) * x[:, d:], registered only where the build lacks it.

vLLM's two routing paths are both covered: the aligned one, and the small-batch one (T*K*4 <= E: no align step,
`topk_ids` go straight to the kernel, which writes zeros for id -1 blocks).

Run as `python -m alloc_moe.backends.vllm.kernel_check` (prints one JSON line per case; exit 1 on a failed case).
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
from pathlib import Path

import torch


# ---- torch stand-ins for vLLM's CUDA MoE ops ---------------------------------------------------------------------
def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int, sorted_token_ids: torch.Tensor,
                         experts_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                         expert_map: torch.Tensor | None = None, scatter_idx: torch.Tensor | None = None) -> None:
    """`vllm._custom_ops.moe_align_block_size` in torch (same arguments, fills the three outputs in place).

    topk_ids [T, K]; sorted_token_ids [max_padded] <- flat pair indices grouped by expert, each group padded to a
    multiple of block_size with T*K; experts_ids [max_blocks] <- the expert of each block (-1 past the end);
    num_tokens_post_pad [1] <- the padded total. Pairs with id < 0 (or, with expert_map, a local id < 0) are skipped.
    Static shapes and no host sync (scatter, stable sort, searchsorted), so it can be captured in a CUDA graph.
    """
    if scatter_idx is not None:
        raise NotImplementedError("scatter_idx is not used by the unquantized Triton experts")
    E, dev = num_experts, topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [P] pairs, token-major
    numel = flat.numel()
    local = flat if expert_map is None else torch.where(
        flat >= 0, expert_map.index_select(0, flat.clamp(min=0)).long(), flat)
    key = torch.where((local >= 0) & (local < E), local, E)  # [P] expert, E = skipped
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))  # [E+1]
    padded = (counts[:E] + block_size - 1) // block_size * block_size  # [E]
    ends = torch.cumsum(padded, 0)  # [E]
    starts = torch.cat([ends - padded, ends[-1:]])  # [E+1] (skipped pairs: past the end)
    order = torch.argsort(key, stable=True)  # [P] kept pairs grouped by expert, skipped ones last
    e_sorted = key.gather(0, order)  # [P] (gather / index_select: integer indexing, nothing read on the host)
    run_start = torch.cumsum(counts, 0) - counts  # [E+1] where each expert's run starts in `order`
    rank = torch.arange(numel, device=dev) - run_start.index_select(0, e_sorted)  # [P] position in the expert's run
    dest = torch.where(e_sorted < E, starts.index_select(0, e_sorted) + rank, sorted_token_ids.numel())  # [P]
    buf = torch.full((sorted_token_ids.numel() + 1,), numel, dtype=sorted_token_ids.dtype, device=dev)
    sorted_token_ids.copy_(buf.scatter_(0, dest, order.to(buf.dtype))[:-1])
    block_starts = torch.arange(experts_ids.numel(), device=dev) * block_size  # [B]
    eid = torch.searchsorted(ends, block_starts, right=True)  # [B] the expert whose rows hold the block's start
    experts_ids.copy_(torch.where(eid < E, eid, -1).to(experts_ids.dtype))
    num_tokens_post_pad.copy_(padded.sum().reshape(1).to(num_tokens_post_pad.dtype))


def moe_sum(input: torch.Tensor, output: torch.Tensor, topk_ids: torch.Tensor | None = None,
            expert_map: torch.Tensor | None = None) -> None:
    """`vllm._custom_ops.moe_sum` in torch: output [T, H] <- sum over slots of input [T, K, H]; with `topk_ids`,
    slots whose id is < 0 (or whose `expert_map` entry is < 0) are skipped, never read."""
    if topk_ids is None:
        output.copy_(input.sum(dim=1))
        return
    keep = topk_ids >= 0  # [T, K]
    if expert_map is not None:
        keep = keep & (expert_map.index_select(0, topk_ids.clamp(min=0).long().flatten()).view_as(topk_ids) >= 0)
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
def enable_interpreter(vllm: bool = True) -> None:
    """Make vLLM's Triton kernels run on CPU tensors: `TRITON_INTERPRET=1` before Triton is imported, and (`vllm`) the
    real Triton in `vllm.triton_utils` (the CPU build hands out placeholders) before fused_moe is imported."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set; run in a fresh process")
    os.environ["TRITON_INTERPRET"] = "1"
    if not vllm:
        return
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


# ---- vLLM's kernel without vLLM (the GPU check: a machine with Triton and torch but no vLLM) -------------------------
KERNELS = ("write_zeros_to_output", "fused_moe_kernel")  # fused_moe_kernel's only module-level dependencies: tl, triton


def vllm_kernel_file() -> Path:
    """The installed vLLM's `fused_moe/fused_moe.py`, found without importing vLLM."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("vLLM is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model_executor/layers/fused_moe/fused_moe.py"


def load_kernels(source: str | Path, cache_dir: str | Path):
    """`fused_moe_kernel` (and the helper it calls) cut verbatim out of vLLM's `fused_moe.py` at `source`, written to a
    module under `cache_dir` (Triton's jit reads a kernel's source from its file) and imported with the real Triton."""
    import ast
    import hashlib
    import importlib.util

    text = Path(source).read_text(encoding="utf-8")
    lines = text.splitlines()
    nodes = {n.name: n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name in KERNELS}
    missing = [k for k in KERNELS if k not in nodes]
    if missing:
        raise RuntimeError(f"{source} has no {missing[0]}: not a vLLM fused_moe.py this check knows")
    body = ["import triton", "import triton.language as tl", ""]
    for name in KERNELS:
        n = nodes[name]
        first = min([d.lineno for d in n.decorator_list] + [n.lineno])
        body += lines[first - 1: n.end_lineno] + ["", ""]
    digest = hashlib.sha256(text.encode()).hexdigest()
    path = Path(cache_dir) / f"vllm_fused_moe_kernels_{digest[:12]}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(body), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.SOURCE_SHA256 = digest
    return mod


def default_config(M: int, E: int) -> dict:
    """vLLM 0.32's `get_default_config` for bf16/fp16/fp32 (no tuned config file): tile sizes by token count M."""
    block_m = 16 if M <= 32 else 32 if M <= 96 else 64 if M <= 512 else 128
    return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 64 if M <= 64 else 128, "BLOCK_SIZE_K": 128 if M <= 64 else 64,
            "GROUP_SIZE_M": 16 if M // max(E, 1) > 128 else 1, "SPLIT_K": 1, "num_warps": 4 if M <= 128 else 8,
            "num_stages": 4 if M <= 32 else 3}


def _tl_type(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def launch(kernels, A, B, C, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, mul_routed_weight,
           top_k, config) -> None:
    """vLLM 0.32's `invoke_fused_moe_triton_kernel` for unquantized weights without bias (the launch our models use):
    A [M, K'] tokens, B [E, N, K'] expert weights, C [M, top_k, N] written for every kept pair."""
    import triton

    M = A.size(0)
    num_tokens = M * top_k
    if sorted_token_ids is not None:
        EM = sorted_token_ids.size(0)
        if M < config["BLOCK_SIZE_M"]:
            EM = min(EM, M * top_k * config["BLOCK_SIZE_M"])
    else:
        EM = num_tokens * config["BLOCK_SIZE_M"]
    cfg = dict(config, SPLIT_K=1)
    grid = (triton.cdiv(EM, cfg["BLOCK_SIZE_M"]) * triton.cdiv(B.size(1), cfg["BLOCK_SIZE_N"]),)
    kernels.fused_moe_kernel[grid](
        a_ptr=A, b_ptr=B, c_ptr=C, b_bias_ptr=None, a_scale_ptr=None, b_scale_ptr=None, topk_weights_ptr=topk_weights,
        sorted_token_ids_ptr=sorted_token_ids, expert_ids_ptr=expert_ids,
        num_tokens_post_padded_ptr=num_tokens_post_padded, N=B.size(1), K=B.size(2), EM=EM,
        num_valid_tokens=num_tokens, stride_am=A.stride(0), stride_ak=A.stride(1), stride_be=B.stride(0),
        stride_bk=B.stride(2), stride_bn=B.stride(1), stride_cm=C.stride(1), stride_cn=C.stride(2), stride_asm=0,
        stride_ask=0, stride_bse=0, stride_bsk=0, stride_bsn=0, stride_bbe=0, stride_bbn=0, group_n=0, group_k=0,
        naive_block_assignment=sorted_token_ids is None, MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k,
        compute_type=_tl_type(A.dtype), use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False,
        per_channel_quant=False, HAS_BIAS=False, SWAP_AB=False, USE_TD=False, **cfg)


def standalone_apply(kernels, output, hidden, w1, w2, topk_weights, topk_ids, config, ws13, ws2,
                     activation=silu_and_mul) -> None:
    """vLLM 0.32's `TritonExperts.apply` for an unquantized layer, with our patch's pad-aware reduction, from the kernel
    alone: align (or the small-batch path), GEMM 1, silu-and-mul, GEMM 2 (router weights applied), `moe_sum` given
    `topk_ids`. Workspaces alias as vLLM's do (cache 1 and cache 3 share `ws2`). No host sync: capturable.
    `activation(out, x)`: vLLM's `torch.ops._C.silu_and_mul` where the build has one, for bit-equal comparisons."""
    T, H = hidden.shape
    E, N, _ = w1.shape
    K = topk_ids.shape[1]
    cache1 = ws2[: T * K * N].view(T, K, N)
    cache2 = ws13[: T * K * (N // 2)].view(T * K, N // 2)
    cache3 = ws2[: T * K * H].view(T, K, H)
    bm = config["BLOCK_SIZE_M"]
    if T * K * 4 <= E:  # vLLM's small-batch path: no align, ids straight to the kernel
        sorted_ids, expert_ids = None, topk_ids.view(-1)
        post = torch.full((1,), topk_ids.numel() * bm, dtype=torch.int32, device=hidden.device)
    else:
        max_padded = topk_ids.numel() + E * (bm - 1)
        if topk_ids.numel() < E:
            max_padded = min(topk_ids.numel() * bm, max_padded)
        sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=hidden.device)
        expert_ids = torch.empty((max_padded + bm - 1) // bm, dtype=torch.int32, device=hidden.device)
        post = torch.empty(1, dtype=torch.int32, device=hidden.device)
        moe_align_block_size(topk_ids, E, bm, sorted_ids, expert_ids, post)
    launch(kernels, hidden, w1, cache1, None, sorted_ids, expert_ids, post, False, K, config)
    activation(cache2, cache1.view(-1, N))
    launch(kernels, cache2, w2, cache3, topk_weights, sorted_ids, expert_ids, post, True, 1, config)
    moe_sum(cache3, output, topk_ids)


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
# Full-width DeepSeek-V2-Lite MoE layers (hidden 2048, 64 experts, K_orig 6, moe_intermediate 1408): the tile
# configs and both paths at the paper's shapes. Too slow for the interpreter: run on a GPU (benchmarks/gpu_check.py).
FULL_WIDTH_CASES = [
    Case("deepseek-width-prefill-bf16", 256, 64, 6, 2048, 1408, torch.bfloat16),
    Case("deepseek-width-decode-bf16", 8, 64, 6, 2048, 1408, torch.bfloat16),
    Case("deepseek-width-small-batch-bf16", 2, 64, 6, 2048, 1408, torch.bfloat16),
    Case("deepseek-width-decode-fp32", 8, 64, 6, 2048, 1408, torch.float32),
]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # max |diff| / max |ref|


def make_inputs(case: Case, device: str = "cpu"):
    """hidden [T, H], w1 [E, 2I, H], w2 [E, H, I], topk_weights [T, K] (0 where dropped), topk_ids [T, K] (-1 where
    dropped; each token's ids distinct, as a router's)."""
    g = torch.Generator().manual_seed(case.seed)
    T, E, K, H, inter = case.tokens, case.experts, case.top_k, case.hidden, case.inter
    hidden = torch.randn(T, H, generator=g) / math.sqrt(H)
    w1 = torch.randn(E, 2 * inter, H, generator=g) / math.sqrt(H)
    w2 = torch.randn(E, H, inter, generator=g) / math.sqrt(inter)
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
    """[T, H] in float64 on the inputs' device: sum over kept pairs (id >= 0) of weight * w2_e @ (silu(gate) * up)(w1_e @ x),
    one expert at a time."""
    h = hidden.double()
    out = torch.zeros_like(h)
    inter = w1.shape[1] // 2
    for e in topk_ids[topk_ids >= 0].unique().tolist():
        t, k = (topk_ids == e).nonzero(as_tuple=True)  # the pairs routed to expert e
        gu = h[t] @ w1[e].double().T  # [n, 2I]
        act = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]  # [n, I]
        out.index_add_(0, t, topk_weights[t, k].double()[:, None] * (act @ w2[e].double().T))
    return out


VARIANTS = ("patched", "unpatched", "reduction-without-topk-ids")


def reduction_without_topk_ids_class(tmp_dir: str):
    """A `TritonExperts` subclass whose `apply` is the installed one with its final reduction called as vLLM 0.26.0
    calls it, `self.moe_sum(intermediate_cache3, output)`. Its source is written to `tmp_dir` so that
    `inspect.getsource` (the start-up check) reads it like any installed code."""
    import inspect
    import textwrap

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
        FUSED_MOE_UNQUANTIZED_CONFIG,
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from .experts import _patch_triton, pad_aware_moe_sum

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
        pad_aware_moe_sum(fe)  # what _patch_triton installs once its check passes
    return fe


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


def _interpreter_safe(inputs, device: str):
    """Triton's interpreter multiplies bf16 `tl.dot` operands as raw uint16 bits (triton-lang/triton#11584): on CPU,
    bf16 operands are upcast (exact: bf16 -> fp32 loses nothing); the case keeps bf16's tolerance."""
    hidden, w1, w2, weights, ids = inputs
    if hidden.dtype == torch.bfloat16 and device == "cpu":
        return hidden.float(), w1.float(), w2.float(), weights, ids
    return inputs


def check_case(case: Case, device: str = "cpu", variant: str = "patched") -> dict:
    """Run `case` through vLLM's Triton experts (`variant`) and compare with `dense_reference`."""
    inputs = make_inputs(case, device)
    hidden, w1, w2, weights, ids = inputs
    inputs = _interpreter_safe(inputs, device)
    fe = triton_experts(dataclasses.replace(case, dtype=inputs[0].dtype), variant)
    with torch_ops():
        got = run_apply(fe, case, inputs).double().cpu()
    ref = dense_reference(hidden.cpu(), w1.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    scale = float(ref.abs().max()) or 1.0
    err = float((got - ref).abs().max()) / scale if not torch.isnan(got).any() else float("nan")
    ok = math.isfinite(err) and err <= TOL[case.dtype]
    return {"case": case.name, "variant": variant, "path": "small-batch" if case.small_batch else "aligned",
            "dtype": str(case.dtype),
            "tokens": case.tokens, "experts": case.experts, "top_k": case.top_k,
            "dropped_pairs": int((ids < 0).sum()), "pairs": ids.numel(), "nan_rows": int(torch.isnan(got).any(1).sum()),
            "rel_max_err": err, "tol": TOL[case.dtype], "ok": ok}


def _nan_buffers(case: Case, T: int, N: int, H: int, K: int, dtype, device):
    """Workspaces and output of vLLM's shapes (TritonExperts.workspace_shapes), NaN-filled."""
    ws13 = torch.full((T * K * max(N // 2, H),), float("nan"), dtype=dtype, device=device)
    ws2 = torch.full((T * K * max(N, H),), float("nan"), dtype=dtype, device=device)
    return ws13, ws2, torch.full((T, H), float("nan"), dtype=dtype, device=device)


def check_standalone(case: Case, kernels, device: str = "cpu", graph: bool = False) -> dict:
    """`case` through the kernel cut out of vLLM (`standalone_apply`), against the dense reference: eagerly, or
    captured once in a CUDA graph and replayed on two routings (the second one written into the captured routing
    buffers, with other pairs dropped), workspaces refilled with NaN before each replay."""
    hidden, w1, w2, weights, ids = _interpreter_safe(make_inputs(case, device), device)
    T, H, K, N = hidden.shape[0], hidden.shape[1], ids.shape[1], w1.shape[1]
    config = default_config(T, case.experts)
    ws13, ws2, out = _nan_buffers(case, T, N, H, K, hidden.dtype, device)
    runs = [(weights, ids)]
    if graph:
        _, _, _, w_b, ids_b = make_inputs(dataclasses.replace(case, seed=case.seed + 1), device)
        runs.append((w_b, ids_b))
        weights, ids = weights.clone(), ids.clone()  # the captured routing buffers
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles at the first launch, outside the capture
            standalone_apply(kernels, out, hidden, w1, w2, weights, ids, config, ws13, ws2)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            standalone_apply(kernels, out, hidden, w1, w2, weights, ids, config, ws13, ws2)
    errs, nan_rows = [], 0
    for w_run, ids_run in runs:
        for buf in (ws13, ws2, out):
            buf.fill_(float("nan"))
        if graph:
            weights.copy_(w_run)
            ids.copy_(ids_run)
            g.replay()
            torch.cuda.synchronize()
        else:
            standalone_apply(kernels, out, hidden, w1, w2, w_run, ids_run, config, ws13, ws2)
        got = out.double().cpu()
        ref = dense_reference(hidden.cpu(), w1.cpu(), w2.cpu(), w_run.cpu(), ids_run.cpu())
        nan_rows += int(torch.isnan(got).any(1).sum())
        errs.append(float((got - ref).abs().max()) / (float(ref.abs().max()) or 1.0))
    err = max(errs) if nan_rows == 0 else float("nan")
    return {"case": case.name, "variant": "standalone-graph" if graph else "standalone", "config": config,
            "path": "small-batch" if case.small_batch else "aligned", "dtype": str(case.dtype), "tokens": T,
            "experts": case.experts, "top_k": K, "dropped_pairs": int((ids < 0).sum()), "pairs": ids.numel(),
            "replays": len(runs) if graph else 0, "nan_rows": nan_rows, "rel_max_err": err, "tol": TOL[case.dtype],
            "ok": math.isfinite(err) and err <= TOL[case.dtype]}


def standalone_matches_vllm(case: Case, kernels) -> dict:
    """The cut-out kernel with `standalone_apply` against vLLM's own `TritonExperts.apply` (patched) on the same
    inputs and tile config: bit-equal outputs mean the GPU check (which has no vLLM) runs what vLLM runs."""
    from vllm.model_executor.layers.fused_moe import fused_moe as fm

    inputs = _interpreter_safe(make_inputs(case), "cpu")
    hidden, w1, w2, weights, ids = inputs
    T, H, K, N = hidden.shape[0], hidden.shape[1], ids.shape[1], w1.shape[1]
    fe = triton_experts(dataclasses.replace(case, dtype=hidden.dtype))
    with torch_ops():
        theirs = run_apply(fe, case, inputs)
    config = fm.try_get_optimal_moe_config(w1.size(), w2.size(), K, None, T)
    ws13, ws2, ours = _nan_buffers(case, T, N, H, K, hidden.dtype, "cpu")
    standalone_apply(kernels, ours, hidden, w1, w2, weights, ids, config, ws13, ws2, torch.ops._C.silu_and_mul)
    same = torch.equal(ours, theirs)
    return {"case": case.name, "variant": "standalone-vs-vllm", "config": config, "bit_equal": same, "ok": same}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: CASES on CPU, CASES and "
                                                 "FULL_WIDTH_CASES on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", default="patched", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--standalone", metavar="FUSED_MOE_PY", default=None,
                   help="run the kernel cut out of this vLLM fused_moe.py instead of vLLM ('installed': the installed "
                        "vLLM's file; vLLM itself need not be importable)")
    p.add_argument("--graph", action="store_true", help="with --standalone on CUDA: also inside a captured CUDA graph")
    p.add_argument("--against-vllm", action="store_true",
                   help="with --standalone on CPU: compare with vLLM's own TritonExperts.apply (bit-equal expected)")
    p.add_argument("--cache-dir", default=None, help="where --standalone writes the extracted kernel module")
    args = p.parse_args(argv)
    variants = args.variant.split(",")
    names = {c.name: c for c in CASES + FULL_WIDTH_CASES}
    if args.cases is None:
        args.cases = ",".join(c.name for c in CASES + (FULL_WIDTH_CASES if args.device.startswith("cuda") else []))
    bad = [v for v in variants if v not in VARIANTS] + [c for c in args.cases.split(",") if c not in names]
    if bad:
        p.error(f"unknown variant or case {bad[0]!r}; variants: {', '.join(VARIANTS)}; cases: {', '.join(names)}")
    if args.device == "cpu":
        enable_interpreter(vllm=args.standalone is None or args.against_vllm)
    else:
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # no TF32 in Triton's fp32 tl.dot: parity at fp32
        torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    if args.standalone is not None:
        import tempfile

        src = vllm_kernel_file() if args.standalone == "installed" else Path(args.standalone)
        kernels = load_kernels(src, args.cache_dir or tempfile.mkdtemp(prefix="alloc_moe_kernels."))
        for name in args.cases.split(","):
            checks = [lambda c: standalone_matches_vllm(c, kernels)] if args.against_vllm else [
                lambda c, g=g: check_standalone(c, kernels, args.device, g) for g in ((False, True) if args.graph
                                                                                      else (False,))]
            for check in checks:
                res = check(names[name]) | {"source_sha256": kernels.SOURCE_SHA256,
                                            "vllm_imported": "vllm" in sys.modules}
                ok &= res["ok"]
                print(json.dumps(res), flush=True)
        return 0 if ok else 1
    for variant in variants:
        for name in args.cases.split(","):
            res = check_case(names[name], args.device, variant)
            ok &= res["ok"]
            print(json.dumps(res), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
