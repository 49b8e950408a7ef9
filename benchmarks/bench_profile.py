"""Algorithm 1 profiling: prefix reuse vs the naive path on a 16-layer MoE, timed in the same run.

    python benchmarks/bench_profile.py [--topology olmoe-1b-7b-0924] [--windows 16] [--seq-len 64]

Prints a markdown row with both times, their ratio (goal <= 0.55) and the largest relative difference of S.
"""

import argparse
import platform
import time

import numpy as np
import torch

from alloc_moe.data.zoo import make_model
from alloc_moe.stages.profile import profile_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="olmoe-1b-7b-0924")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    model = make_model(topology=args.topology, router_std=1.0, seed=0)
    ids = torch.randint(0, 256, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    times = {}
    for reuse in (False, True):
        t = time.perf_counter()
        _, S = profile_perplexity(model, ids, batch_size=args.batch_size, prefix_reuse=reuse, progress=False)
        times[reuse] = (time.perf_counter() - t, S)
    (t_naive, S_naive), (t_reuse, S_reuse) = times[False], times[True]
    L, K = S_naive.shape
    print(f"# {args.topology} (tiny width): {L} MoE layers, K_orig={K}, {args.windows}x{args.seq_len} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| path | seconds | ratio to naive |")
    print("|---|---|---|")
    print(f"| naive (1 + L*(K-1) full passes) | {t_naive:.2f} | 1.00 |")
    print(f"| prefix reuse | {t_reuse:.2f} | {t_reuse / t_naive:.2f} |")
    print(f"max relative difference of S: {np.abs(S_reuse / S_naive - 1).max():.2e}")


if __name__ == "__main__":
    main()
