#!/usr/bin/env python
"""Where the time of one MoE layer forward + backward goes (torch.profiler), next to the dense bound.

    .venv/bin/python benchmarks/profile_moe_layer.py --device cpu --dim 384 --batch 8 --precision bf16
    python benchmarks/profile_moe_layer.py --device cuda --dim 768 --batch 32 --precision bf16

Prints the top operators by self time (device time on CUDA) of `--steps` profiled steps for the
package layer and for the dense SwiGLU with the same activated FLOPs (`official_moe.DenseBound`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from official_moe import DenseBound  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--shapes", action="store_true", help="group by input shapes")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (by default freed memory is kept, as in moe_bench.py)")
    a = p.parse_args()
    if not a.default_malloc:
        from ditmoe.cpu_allocator import keep_freed_memory

        keep_freed_memory()

    from ditmoe import kernels
    from ditmoe.models.moe import MoE

    dev = torch.device(a.device)
    d = a.dim
    dtype = torch.bfloat16 if a.precision == "bf16" else None
    torch.manual_seed(0)
    layers = {"package": kernels.apply(MoE(d, 8, 2, 4 * d, 2 * d).to(dev)), "bound": DenseBound(d, 2, 4 * d, 2 * d).to(dev)}
    x = torch.randn(a.batch, a.tokens, d, device=dev, requires_grad=True)
    g = torch.randn_like(x)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    for name, mod in layers.items():
        def step():
            for q in mod.parameters():
                q.grad = None
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = mod(x, return_aux=True) if name == "package" else mod(x)
            y, aux = out if isinstance(out, tuple) else (out, None)
            if aux is not None:
                torch.autograd.backward([y, aux], [g.to(y.dtype), torch.ones_like(aux)])
            else:
                y.backward(g.to(y.dtype))

        for _ in range(2):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=acts, record_shapes=a.shapes) as prof:
            for _ in range(a.steps):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        print(f"\n=== {name}: D={d}, {a.batch}x{a.tokens} tokens, {a.precision}, {a.steps} steps on {dev} ===")
        print(prof.key_averages(group_by_input_shape=a.shapes).table(sort_by=sort, row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
