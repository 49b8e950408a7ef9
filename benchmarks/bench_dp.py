"""Alloc-L dynamic program (eq. 6) run time (not asserted: numbers depend on the machine).

pytest-benchmark (the project's addopts skip benchmarks, so override them):
    .venv/bin/pytest benchmarks/bench_dp.py -o addopts="" -o python_files="bench_*.py" --benchmark-only

Script mode (markdown table):
    .venv/bin/python benchmarks/bench_dp.py [--min-run-time 1.0]
"""

import argparse
import platform

import numpy as np
import pytest

from alloc_moe import alloc_l

# (label, L, K_orig, budgets): the paper's three models (Table 1, section 4.1) and a 61-layer, top-8 model
CASES = [
    ("DeepSeek-V2-Lite", 26, 6, (130, 104, 78, 52)),
    ("Qwen1.5-MoE-A2.7B", 24, 4, (84, 72, 60, 48)),
    ("OLMoE-1B-7B", 16, 8, (112, 96, 80, 64)),
    ("61 layers, top-8", 61, 8, (488, 366, 244)),
]
FLAT = [(label, L, K, B) for label, L, K, bs in CASES for B in bs]


def sensitivity(L: int, K: int, seed: int = 0) -> np.ndarray:
    """Perplexity-like rows: falling with k, a different slope per layer."""
    rng = np.random.default_rng(seed)
    steps = rng.random((L, K)) * rng.random((L, 1)) + 0.01
    return 10.0 + np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]


@pytest.mark.parametrize("label,L,K,B", FLAT, ids=[f"L{L}-K{K}-B{B}" for _, L, K, B in FLAT])
def test_bench_alloc_l(benchmark, label, L, K, B):
    S = sensitivity(L, K)
    benchmark.group = label
    ks = benchmark(alloc_l, S, B)
    assert sum(ks) <= B


def main() -> None:
    from torch.utils.benchmark import Timer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement (default 1.0)")
    args = ap.parse_args()
    print(f"alloc_l (exact DP of eq. 6) on a random perplexity-like S [L, K_orig], CPU "
          f"({platform.processor() or platform.machine()}), numpy {np.__version__}, median of torch.utils.benchmark.Timer")
    print()
    print("| model | L | K_orig | B | alloc_l (ms) |")
    print("|---|---:|---:|---:|---:|")
    for label, L, K, B in FLAT:
        S = sensitivity(L, K)
        m = Timer(stmt="alloc_l(S, B)", globals={"alloc_l": alloc_l, "S": S, "B": B}).blocked_autorange(
            min_run_time=args.min_run_time)
        print(f"| {label} | {L} | {K} | {B} | {m.median * 1e3:.3f} |")


if __name__ == "__main__":
    main()
