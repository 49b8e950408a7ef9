"""Make a layer's expert kernel skip the pairs our router patch dropped (expert id -1, weight 0), per kernel family.

- CPU (`CPUUnquantizedExperts`, `torch.ops._C.cpu_fused_moe`): the kernel has no bounds check (id -1 or E corrupts
  memory), so sentinels must never reach it. `cpu_kept_pairs_moe` runs only the kept pairs: each kept pair becomes
  one row with one expert, the kernel computes those P rows, and the rows are added back per token. The cost follows
  the kept pairs and the result is exact. It is a torch custom op, so torch.compile treats it as one opaque call and
  its data-dependent shapes stay inside.
- CUDA (`TritonExperts`): the align and GEMM kernels already skip ids < 0; only the final reduction `moe_sum` sums
  every slot when there is no expert map (including rows never written for dropped pairs). We make it call the
  pad-aware `ops.moe_sum(input, output, topk_ids, expert_map)` whenever topk_ids is given, and refuse an experts
  class whose `apply` does not hand `topk_ids` to `moe_sum` (`compat.reduction_passes_topk_ids`). Static shapes, no
  host sync, CUDA-graph safe. vLLM's own Triton experts with this patch are checked against a dense reference under
  Triton's interpreter on CPU (`kernel_check`); not yet run on a GPU in this project.
"""

import types

import torch

from ...errors import AllocMoeError


def _cpu_moe():
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    return cpu_moe


def kept_pairs_moe(
    output: torch.Tensor,  # [T, H] written
    hidden_states: torch.Tensor,  # [T, H]
    w1: torch.Tensor,
    w2: torch.Tensor,
    w1_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    topk_weights: torch.Tensor,  # [T, K] 0 where dropped
    topk_ids: torch.Tensor,  # [T, K] -1 where dropped
    act: str,
    isa: str,
    skip_weighted: bool,
) -> None:
    """The kept pairs of [T, K] routing as P rows of one expert each through `cpu_fused_moe`, added back per token.
    Flat indices and `index_select` only (no 2-D advanced indexing), into reused row buffers (`_rows`): the
    gather/scatter around the kernel is two row copies of [P, H], a zero fill of [T, H] and a few [P] ops."""
    K = topk_ids.shape[1]
    flat = (topk_ids.reshape(-1) >= 0).nonzero().squeeze(1)  # [P] kept slots t*K + k, token-major
    P = flat.numel()
    if P == 0:
        output.zero_()
        return
    tok = torch.div(flat, K, rounding_mode="floor")  # [P]
    xs = torch.index_select(hidden_states, 0, tok, out=_rows("x", P, hidden_states))  # [P, H]
    rows = _rows("out", P, output)  # [P, H]
    _cpu_moe().cpu_fused_moe(
        rows, xs, w1, w2, w1_bias, w2_bias,
        topk_weights.reshape(-1).index_select(0, flat).view(P, 1).to(torch.float32),
        topk_ids.reshape(-1).index_select(0, flat).view(P, 1).to(torch.int32),
        act, isa, skip_weighted,
    )
    output.zero_().index_add_(0, tok, rows)


_ROWS: dict = {}


def _rows(role: str, P: int, like: torch.Tensor) -> torch.Tensor:
    """A [P, H] view of a buffer kept per (role, H, dtype) that only grows: a fresh multi-MB tensor per call costs
    page faults on every layer of every step."""
    key = (role, like.shape[1], like.dtype, like.device)
    buf = _ROWS.get(key)
    if buf is None or buf.shape[0] < P:
        buf = _ROWS[key] = torch.empty((P, like.shape[1]), dtype=like.dtype, device=like.device)
    return buf[:P]


@torch.library.custom_op("alloc_moe::cpu_kept_pairs_moe", mutates_args=("output",))
def cpu_kept_pairs_moe(
    output: torch.Tensor,
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w1_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act: str,
    isa: str,
    skip_weighted: bool,
) -> None:
    """`kept_pairs_moe` as one opaque op for torch.compile (its data-dependent shapes stay inside)."""
    kept_pairs_moe(output, hidden_states, w1, w2, w1_bias, w2_bias, topk_weights, topk_ids, act, isa, skip_weighted)


@cpu_kept_pairs_moe.register_fake
def _(output, hidden_states, w1, w2, w1_bias, w2_bias, topk_weights, topk_ids, act, isa, skip_weighted) -> None:
    return None


def _patch_cpu(fe) -> None:
    if getattr(fe, "_use_zentorch", False):
        raise AllocMoeError("alloc_moe cannot skip dropped pairs in the zentorch MoE kernel; unset zentorch")

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):
        # eager engines call the function itself (no custom-op dispatch per layer); traced code gets the opaque op
        fn = torch.ops.alloc_moe.cpu_kept_pairs_moe if torch.compiler.is_compiling() else kept_pairs_moe
        fn(output, hidden_states, w1, w2, self.w1_bias, self.w2_bias, topk_weights, topk_ids, activation.value,
           self.isa, apply_router_weight_on_input)

    fe.apply = types.MethodType(apply, fe)


def _patch_triton(fe) -> None:
    from .compat import SUPPORTED, reduction_passes_topk_ids

    if not reduction_passes_topk_ids(type(fe).apply):  # e.g. vLLM 0.26.0, or a subclass with its own apply
        raise AllocMoeError(f"{type(fe).__name__}.apply calls moe_sum without topk_ids, so the pairs dropped by the "
                            f"plan would be summed from unwritten rows; {SUPPORTED}")
    pad_aware_moe_sum(fe)


def pad_aware_moe_sum(fe) -> None:
    """Make `fe.moe_sum` skip slots with id < 0 whenever it is given `topk_ids` (vLLM's own does so only with an
    expert map)."""
    from vllm import _custom_ops as ops

    def moe_sum(self, input, output, topk_ids=None, expert_map=None):
        if topk_ids is not None:
            ops.moe_sum(input, output, topk_ids, expert_map)  # skips slots with id < 0
        else:
            ops.moe_sum(input, output)

    fe.moe_sum = types.MethodType(moe_sum, fe)


def _fused_experts(runner):
    qm = runner.routed_experts.quant_method
    kernel = getattr(qm, "moe_kernel", None)
    if kernel is None or getattr(qm, "is_monolithic", False):
        raise AllocMoeError(
            f"{runner.layer_name}: {type(qm).__name__} uses a monolithic MoE kernel that routes internally; variable "
            "experts per token need a modular one (CPU unquantized, or Triton: set moe_backend='triton')")
    return kernel.fused_experts


def patch_experts(layer) -> None:
    """Make `layer.runner`'s expert kernel skip dropped pairs (id -1). Raises AllocMoeError for unsupported kernels."""
    fe = _fused_experts(layer.runner)
    if getattr(fe, "_alloc_moe_patched", False):
        return
    cpu_moe = _cpu_moe()
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    if isinstance(fe, cpu_moe.CPUUnquantizedExperts):  # and its ISA subclasses (x86, Arm, Power)
        _patch_cpu(fe)
    elif isinstance(fe, TritonExperts):
        _patch_triton(fe)
    else:
        raise AllocMoeError(
            f"{layer.name}: expert kernel {type(fe).__name__} is not supported for variable experts per token; "
            "supported: CPUUnquantizedExperts (vLLM CPU), TritonExperts (CUDA, moe_backend='triton')")
    fe._alloc_moe_patched = True


def unpatch_experts(layer) -> None:
    fe = _fused_experts(layer.runner)
    for name in ("apply", "moe_sum", "_alloc_moe_patched"):
        fe.__dict__.pop(name, None)
