#!/usr/bin/env python
"""Where the time of one whole training step or sampling forward goes (torch.profiler), for the
package model at a chosen precision and for the official baseline in fp32, as `moe_bench.py` runs them.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_train_step.py --what train --precision bf16
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_train_step.py --what sample --contender official

Prints the step's median wall time over `--steps` unprofiled steps, then the top operators by
self CPU time of `--steps` profiled steps (`--shapes` splits them by input shape).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from moe_bench import TrainStep, autocast, build_package_model, make_batch  # noqa: E402
from official_moe import officialize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-MoE-S/2-8E2A")
    p.add_argument("--what", choices=["train", "sample"], default="train")
    p.add_argument("--contender", choices=["package", "official"], default="package")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="package only (official: fp32)")
    p.add_argument("--batch", type=int, default=16, help="images (sampling: 2x this through the model, CFG)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--shapes", action="store_true", help="group by input shapes")
    a = p.parse_args()
    from ditmoe.cpu_allocator import keep_freed_memory
    from ditmoe.registry import get_config

    keep_freed_memory()
    device = torch.device("cpu")
    cfg = get_config(a.model)
    model = build_package_model(a.model, device)
    dtype = torch.bfloat16 if a.precision == "bf16" and a.contender == "package" else None
    if a.contender == "official":
        model = officialize(model, 2)
    batch = make_batch(cfg, a.batch, device)
    if a.what == "train":
        step = TrainStep(model, model.parameters(), device, dtype, batch, fused_adam=a.contender == "package")
    else:
        model.eval()
        x2 = torch.cat([batch["x"], batch["x"]])
        t2 = torch.cat([batch["t"], batch["t"]])
        y2 = torch.cat([batch["y"], torch.full_like(batch["y"], cfg.num_classes)])

        def step():
            with torch.inference_mode(), autocast(device, dtype):
                return model(x2, t2, y2)

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{a.contender} {a.what} {a.model} batch {a.batch} {dtype or 'fp32'}: "
          f"median {1e3 * statistics.median(times):.1f} ms over {a.steps} steps, threads {torch.get_num_threads()}")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=a.shapes) as prof:
        for _ in range(a.steps):
            step()
    table = prof.key_averages(group_by_input_shape=a.shapes)
    print(table.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
