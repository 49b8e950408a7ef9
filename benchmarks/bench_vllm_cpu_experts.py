"""Cost of variable experts per token on vLLM's CPU expert kernel: does the cost follow the kept pairs?

Same kernel call (`cpu_fused_moe`, vLLM's CPU build), T tokens routed to K_orig experts, half of the pairs dropped
(each token keeps its first K_orig/2 slots). Compared in one run:
- dense:      all T*K_orig pairs (the unpatched model);
- kept pairs: `alloc_moe::cpu_kept_pairs_moe` on the [T, K_orig] routing with id -1 for dropped pairs;
- before:     the op as it was before issue 19 (2-D advanced indexing, custom-op dispatch), as a baseline;
- K/2 direct: the kernel called directly with the T*K_orig/2 kept pairs as [T, K_orig/2] (the ideal).
The calls are interleaved, `--reps` times; prints the median ms and the median [min-max] of the per-repeat ratios to
dense, and checks kept pairs == K/2 direct (max abs gap: the kernel's own per-token sum vs index_add, fp32 rounding).

    python benchmarks/bench_vllm_cpu_experts.py [--tokens 256] [--experts 16] [--hidden 1024] [--inter 512]
        [--reps 21] [--threads 1]
"""

import argparse
import statistics
import time

import torch


def _before(output, hidden_states, w1, w2, topk_weights, topk_ids, act, isa):
    """The kept-pairs op before issue 19 (commit d638d39), for the baseline row."""
    from vllm._custom_ops import cpu_fused_moe

    tok, slot = (topk_ids >= 0).nonzero(as_tuple=True)  # [P], [P]
    P = tok.numel()
    output.zero_()
    rows = torch.empty((P, hidden_states.shape[1]), dtype=output.dtype)  # [P, H]
    cpu_fused_moe(rows, hidden_states.index_select(0, tok).contiguous(), w1, w2, None, None,
                  topk_weights[tok, slot].reshape(P, 1).to(torch.float32).contiguous(),
                  topk_ids[tok, slot].reshape(P, 1).to(torch.int32).contiguous(), act, isa)
    output.index_add_(0, tok, rows)


def _interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()
    ms = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ms[k].append((time.perf_counter() - t) * 1e3)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    from alloc_moe.backends.vllm.experts import kept_pairs_moe

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

    def kept():  # what the patched experts call in an eager engine
        kept_pairs_moe(out, x, w13, w2, None, None, w_dropped, ids_dropped, "silu", "vec", False)

    def before():
        _before(out, x, w13, w2, w_dropped, ids_dropped, "silu", "vec")

    ideal_ids, ideal_w = ids[:, : K // 2].contiguous(), w[:, : K // 2].contiguous()

    def half():
        cpu_fused_moe(out, x, w13, w2, None, None, ideal_w, ideal_ids, "silu", "vec")

    kept()
    got = out.clone()
    half()
    gap = float((got - out).abs().max())
    ms = _interleaved({"dense (all pairs)": dense, "kept pairs (ours)": kept, "before (d638d39)": before,
                       "K/2 direct (ideal)": half}, args.reps)
    print(f"T={T} E={E} K_orig={K} H={H} I={inter} fp32, {args.threads} thread(s), {T * K // 2} of {T * K} pairs kept, "
          f"{args.reps} interleaved repeats")
    for name, v in ms.items():
        r = [a / b for a, b in zip(v, ms["dense (all pairs)"])]
        print(f"{name:<20} {statistics.median(v):8.2f} ms  ratio {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]")
    print(f"max |kept - K/2 direct| = {gap:.2e}")


if __name__ == "__main__":
    main()
