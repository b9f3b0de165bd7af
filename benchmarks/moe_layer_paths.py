#!/usr/bin/env python
"""One MoE layer's forward + backward through each code path, side by side in one process:
the reference model (`ditmoe.models.moe.MoE`) and the same layer after `ditmoe.kernels.apply`,
each with `torch._grouped_mm` and with the loop over expert groups; rounds rotate the order.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/moe_layer_paths.py            # S/2 width, fp32

Prints the median and best time per path; a speed layer earns its place where its path is
faster than the reference beyond the spread of the rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=384, help="hidden size D (S/2: 384)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="tokens per image")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    if min(args.dim, args.images, args.tokens, args.rounds, args.threads) < 1:
        p.error("every size, --rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    from ditmoe import kernels
    from ditmoe.hardware import cpu_info
    from ditmoe.models.moe import MoE

    d = args.dim
    torch.manual_seed(0)
    base = MoE(d, 8, 2, 4 * d, 2 * d)
    x = torch.randn(args.images, args.tokens, d, requires_grad=True)
    g = torch.randn(args.images, args.tokens, d)
    layers = {}
    for name, fast, grouped in (("reference, grouped_mm", False, True), ("reference, loop", False, False),
                                ("kernels, grouped_mm", True, True), ("kernels, loop", True, False)):
        m = copy.deepcopy(base)
        if fast:
            kernels.apply(m, grouped_mm=grouped)
        else:
            m.experts.grouped_mm = grouped
        layers[name] = m
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(m):
        for q in m.parameters():
            q.grad = None
        x.grad = None
        with autocast:
            y, aux = m(x, return_aux=True)
        torch.autograd.backward([y.float(), aux], [g, torch.ones_like(aux)])

    for m in layers.values():  # warm-up (oneDNN kernel JIT, compiled kernels)
        step(m)
    names, times = list(layers), {k: [] for k in layers}
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            step(layers[k])
            times[k].append(time.perf_counter() - t0)
    info = cpu_info()
    print(f"MoE layer D={d}, 8 experts top-2, {args.images}x{args.tokens} tokens, {args.precision}, "
          f"{args.threads} thread(s), {args.rounds} rounds; CPU: {info.model_name}")
    for k, v in times.items():
        print(f"{k:24s} median {1000 * statistics.median(v):8.1f} ms   best {1000 * min(v):8.1f} ms")


if __name__ == "__main__":
    main()
