"""Cost of variable experts per token on vLLM's CPU expert kernel: does the cost follow the kept pairs?

Same kernel call (`cpu_fused_moe`, vLLM's CPU build), T tokens routed to K_orig experts, half of the pairs dropped
(each token keeps its first K_orig/2 slots). Compared in one run:
- dense:      all T*K_orig pairs (the unpatched model);
- kept pairs: `alloc_moe::cpu_kept_pairs_moe` on the [T, K_orig] routing with id -1 for dropped pairs;
- K/2 direct: the kernel called directly with the T*K_orig/2 kept pairs as [T, K_orig/2] (the ideal).
Prints ms and the ratios to dense, and checks kept pairs == K/2 direct.

    python benchmarks/bench_vllm_cpu_experts.py [--tokens 256] [--experts 16] [--hidden 1024] [--inter 512]
"""

import argparse
import time

import torch


def _time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    import alloc_moe.backends.vllm.experts  # noqa: F401  registers torch.ops.alloc_moe.cpu_kept_pairs_moe

    g = torch.Generator().manual_seed(0)
    T, E, K, H, inter = args.tokens, args.experts, args.k, args.hidden, args.inter
    w13 = cpu_prepack_moe_weight(torch.randn(E, 2 * inter, H, generator=g) * 0.02, "vec")
    w2 = cpu_prepack_moe_weight(torch.randn(E, H, inter, generator=g) * 0.02, "vec")
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)  # [T, K]
    w = torch.rand(T, K, generator=g)  # [T, K]
    keep = torch.zeros(T, K, dtype=torch.bool)
    keep[:, : K // 2] = True
    ids_dropped = torch.where(keep, ids, torch.full_like(ids, -1))
    w_dropped = torch.where(keep, w, torch.zeros_like(w))
    out = torch.empty_like(x)

    def dense():
        cpu_fused_moe(out, x, w13, w2, None, None, w, ids, "silu", "vec")

    def kept():
        torch.ops.alloc_moe.cpu_kept_pairs_moe(out, x, w13, w2, None, None, w_dropped, ids_dropped, "silu", "vec",
                                               False)

    ideal_ids, ideal_w = ids[:, : K // 2].contiguous(), w[:, : K // 2].contiguous()

    def half():
        cpu_fused_moe(out, x, w13, w2, None, None, ideal_w, ideal_ids, "silu", "vec")

    kept()
    got = out.clone()
    half()
    gap = float((got - out).abs().max())
    t_dense, t_kept, t_half = _time(dense, args.reps), _time(kept, args.reps), _time(half, args.reps)
    print(f"T={T} E={E} K_orig={K} H={H} I={inter} fp32, 1 thread, {T * K // 2} of {T * K} pairs kept")
    print(f"dense (all pairs)   {t_dense:8.2f} ms  ratio 1.00")
    print(f"kept pairs (ours)   {t_kept:8.2f} ms  ratio {t_kept / t_dense:.2f}")
    print(f"K/2 direct (ideal)  {t_half:8.2f} ms  ratio {t_half / t_dense:.2f}")
    print(f"max |kept - K/2 direct| = {gap:.2e}")


if __name__ == "__main__":
    main()
