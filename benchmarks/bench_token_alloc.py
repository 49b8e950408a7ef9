"""Alloc-T overhead vs plain top-k routing on CPU (not asserted: numbers depend on the machine).

pytest-benchmark (the project's addopts skip benchmarks, so override them):
    .venv/bin/pytest benchmarks/bench_token_alloc.py -o addopts="" -o python_files="bench_*.py" --benchmark-only

Script mode (both timed in the same run, markdown table for the README):
    .venv/bin/python benchmarks/bench_token_alloc.py [--threads 1] [--min-run-time 1.0]
"""

import argparse
import platform

import pytest
import torch

from alloc_moe import alloc_t

E, K_ORIG, K_LAYER, K_BASE = 64, 6, 3.0, 1
TOKENS = (8, 256, 4096)


def make_probs(T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, E, generator=g), dim=-1)


def run_topk(probs):
    return torch.topk(probs, K_ORIG, dim=-1)


def run_alloc_t(probs):
    return alloc_t(probs, K_LAYER, K_BASE, K_ORIG)


@pytest.mark.parametrize("T", TOKENS)
def test_bench_topk(benchmark, T):
    probs = make_probs(T)
    benchmark.group = f"T={T}"
    benchmark(run_topk, probs)


@pytest.mark.parametrize("T", TOKENS)
def test_bench_alloc_t(benchmark, T):
    probs = make_probs(T)
    benchmark.group = f"T={T}"
    mask = benchmark(run_alloc_t, probs)
    assert int(mask.sum()) == int(T * K_LAYER)


def main() -> None:
    from torch.utils.benchmark import Timer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement (default 1.0)")
    args = ap.parse_args()

    rows = []
    for T in TOKENS:
        probs = make_probs(T)
        env = {"probs": probs, "run_topk": run_topk, "run_alloc_t": run_alloc_t}
        med = {}
        for name in ("run_topk", "run_alloc_t"):
            m = Timer(stmt=f"{name}(probs)", globals=env, num_threads=args.threads).blocked_autorange(
                min_run_time=args.min_run_time)
            med[name] = m.median * 1e6
        rows.append((T, med["run_topk"], med["run_alloc_t"], med["run_alloc_t"] / med["run_topk"]))

    print(f"alloc_t(k_layer={K_LAYER:g}, k_base={K_BASE}, k_orig={K_ORIG}) vs torch.topk(probs, {K_ORIG}), "
          f"probs [T, {E}] float32, CPU ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, {args.threads} thread(s), median of torch.utils.benchmark.Timer")
    print()
    print("| T | torch.topk (µs) | alloc_t (µs) | ratio alloc_t / topk |")
    print("|---:|---:|---:|---:|")
    for T, a, b, r in rows:
        print(f"| {T} | {a:.1f} | {b:.1f} | {r:.2f} |")


if __name__ == "__main__":
    main()
