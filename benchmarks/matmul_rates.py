#!/usr/bin/env python
"""How fast this CPU (or GPU) multiplies matrices in fp32 and in bf16, at the shapes of the S/2 model.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/matmul_rates.py

For each (rows, K, N): the mean time of `a @ b` over `--repeats` calls after two warm-up calls,
in fp32 and in bf16, and the rate in GFLOP/s (2 * rows * K * N per product). The ratio bounds what
bf16 autocast can gain over fp32 on the products of a model.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(4096, 384, 3072), (1024, 384, 3072), (576, 384, 3072), (576, 1536, 384), (4096, 1536, 384)]


def mean_ms(fn, repeats: int) -> float:
    fn(), fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, mean of {a.repeats} calls")
    print("| product (rows x K x N) | fp32 | bf16 | bf16 / fp32 speed |")
    print("| --- | --- | --- | --- |")
    for m, k, n in SHAPES:
        x, w = torch.randn(m, k), torch.randn(k, n)
        xb, wb = x.bfloat16(), w.bfloat16()
        t32, t16 = mean_ms(lambda: x @ w, a.repeats), mean_ms(lambda: xb @ wb, a.repeats)
        gflop = 2 * m * k * n / 1e9
        print(f"| {m} x {k} x {n} | {gflop / t32 * 1e3:.0f} GFLOP/s | {gflop / t16 * 1e3:.0f} GFLOP/s | {t32 / t16:.2f}x |")


if __name__ == "__main__":
    main()
