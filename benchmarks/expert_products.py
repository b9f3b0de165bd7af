#!/usr/bin/env python
"""The six matrix products of the stacked experts, grouped (one product per expert) against batched.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/expert_products.py --dim 384 --rows 576

Times, side by side and interleaved, the products of one forward + backward of E SwiGLU experts
with `--rows` rows each: forward x @ w_in, a @ w_out; backward the input gradients through w_out^T
and w_in^T and the weight gradients a^T @ g, x^T @ g. Each as `torch._grouped_mm` over E groups
(what `ditmoe.kernels.moe` runs for unequal groups) and as one `torch.bmm` (what it runs when the
groups are padded to one size), the weight gradients also with a contiguous copy of the
transposed activation. Caches are flushed (untimed) before every call, as in a layer whose
tensors do not stay in cache between its products. This is where the choices in `_EqualGroupsMatmul` come from.
"""

from __future__ import annotations

import argparse

import torch

from moe_bench import run_interleaved  # the interleaved timing of every benchmark here


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=384, help="model width D (expert hidden 4D)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rows", type=int, default=576, help="rows per expert")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    a = p.parse_args()

    from ditmoe.cpu_allocator import keep_freed_memory

    keep_freed_memory()
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    e, m, d, h = a.experts, a.rows, a.dim, 4 * a.dim
    torch.manual_seed(0)
    x, act, g_out, g_h = (torch.randn(e * m, n, dtype=dt) for n in (d, h, d, 2 * h))
    w_in, w_out = torch.randn(e, d, 2 * h, dtype=dt), torch.randn(e, h, d, dtype=dt)
    offs = (torch.arange(1, e + 1) * m).to(torch.int32)
    flush = torch.empty(100_000_000 // 4)  # 100 MB written before each call

    def grouped(lhs, rhs):
        return torch._grouped_mm(lhs, rhs, offs=offs)

    def batched(lhs, rhs):
        return torch.bmm(lhs.view(e, m, -1), rhs)

    def weight_grad(lhs, rhs, copy):  # lhs^T @ rhs per expert
        lt = lhs.view(e, m, -1).transpose(1, 2)
        return torch.bmm(lt.contiguous() if copy else lt, rhs.view(e, m, -1))

    # Each product: (grouped, batched[, batched with a contiguous copy of the transposed activation]).
    products = {
        "x @ w_in": (lambda: grouped(x, w_in), lambda: batched(x, w_in)),
        "a @ w_out": (lambda: grouped(act, w_out), lambda: batched(act, w_out)),
        "g_out @ w_out^T": (lambda: grouped(g_out, w_out.transpose(1, 2)), lambda: batched(g_out, w_out.transpose(1, 2))),
        "g_h @ w_in^T": (lambda: grouped(g_h, w_in.transpose(1, 2)), lambda: batched(g_h, w_in.transpose(1, 2))),
        "a^T @ g_out": (lambda: torch._grouped_mm(act.t(), g_out, offs=offs), lambda: weight_grad(act, g_out, False),
                        lambda: weight_grad(act, g_out, True)),
        "x^T @ g_h": (lambda: torch._grouped_mm(x.t(), g_h, offs=offs), lambda: weight_grad(x, g_h, False),
                      lambda: weight_grad(x, g_h, True)),
    }
    variants = ["grouped", "batched", "batched, a^T copied"]
    calls = {f"{name} | {v}": fn for name, fns in products.items() for v, fn in zip(variants, fns)}
    res = run_interleaved(calls, a.rounds, warmup=1, device=torch.device("cpu"),
                          before_each=lambda: flush.fill_(0.0))
    if any("error" in r for r in res.values()):
        raise SystemExit(f"some products failed: { {k: r['error'] for k, r in res.items() if 'error' in r} }")

    # What `_EqualGroupsMatmul` runs: the copied transpose for x^T @ g_h only.
    package = {name: "batched, a^T copied" if name == "x^T @ g_h" else "batched" for name in products}
    print(f"{e} experts x {m} rows, D={d}, H={h}, {a.dtype}, {torch.get_num_threads()} threads, "
          f"median of {a.rounds} interleaved rounds")
    print(f"{'product':18s}" + "".join(f"{v:>22s}" for v in variants) + f"{'grouped / package':>20s}")
    total_grouped = total_package = 0.0
    for name in products:
        med = {v: res[f"{name} | {v}"]["median_ms"] for v in variants if f"{name} | {v}" in res}
        total_grouped += med["grouped"]
        total_package += med[package[name]]
        cells = "".join(f"{med[v]:19.2f} ms" if v in med else f"{'':22s}" for v in variants)
        print(f"{name:18s}{cells}{med['grouped'] / med[package[name]]:19.2f}x")
    print(f"all six: grouped {total_grouped:.2f} ms, as the package runs equal groups {total_package:.2f} ms: "
          f"{total_grouped / total_package:.2f}x")


if __name__ == "__main__":
    main()
