#!/usr/bin/env python
"""What each speed layer of `ditmoe.kernels` buys in a whole training step, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed_layers.py --precision bf16

One training step (`moe_bench.TrainStep`: rectified-flow loss + balance loss, backward, AdamW) of
the same model and batch, in these contenders, timed in interleaved rounds (the order rotates):

- reference: the plain model of `ditmoe.models`, no speed layer;
- all: `kernels.apply(model)` as the trainer installs it;
- all but one: `kernels.apply` with one option switched off: `fused=False` (the compiled one-pass
  SwiGLU and adaLN kernels), `row_bucket=0` (no padded expert groups), `max_padding=None` (no
  equal groups / batched expert products), `grouped_mm=False` (a loop instead of `torch._grouped_mm`).

Round k trains every contender on the same batch k, a new one each round. The speed-layer
contenders share one model, re-configured by `kernels.apply` before each step
(applying again re-sets the options), and one optimizer; the reference is a second model with the
same weights. The table gives each contender's median and its time relative to "all": a layer
pays where switching it off is slower than "all" by more than the rounds' spread.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from moe_bench import TrainStep, make_batch, randomize_zero_init, run_interleaved  # noqa: E402

OFF = {"all": {}, "fused=False": {"fused": False}, "row_bucket=0": {"row_bucket": 0},
       "max_padding=None": {"max_padding": None}, "grouped_mm=False": {"grouped_mm": False}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-MoE-S/2-8E2A")
    p.add_argument("--router", default="topk_softmax", help="the MoE's routing rule (docs/routing.md)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    if min(a.batch, a.rounds) < 1 or a.warmup < 0:
        p.error("--batch and --rounds must be at least 1, --warmup at least 0")
    from ditmoe import create_model, kernels
    from ditmoe.cpu_allocator import keep_freed_memory
    from ditmoe.registry import get_config

    keep_freed_memory()
    device = torch.device("cpu")
    dtype = torch.bfloat16 if a.precision == "bf16" else None
    torch.manual_seed(0)
    reference = create_model(a.model, router=a.router)
    randomize_zero_init(reference)
    fast = kernels.apply(copy.deepcopy(reference))
    # The k-th call of every contender (one per round) trains on batch k: the routing, and with it
    # the expert group sizes, change between rounds as in training, and are equal within a round.
    batches = [make_batch(get_config(a.model), a.batch, device, seed=k) for k in range(a.warmup + a.rounds)]
    ref_step = TrainStep(reference, reference.parameters(), device, dtype, batches[0], fused_adam=True)
    fast_step = TrainStep(fast, fast.parameters(), device, dtype, batches[0], fused_adam=True)

    def contender(step: TrainStep, options: dict | None):
        calls = [0]

        def run():
            step.batch = batches[calls[0] % len(batches)]
            calls[0] += 1
            if options is not None:
                kernels.apply(fast, **options)
            return step()
        return run

    contenders = {"reference": contender(ref_step, None),
                  **{name: contender(fast_step, opts) for name, opts in OFF.items()}}
    res = run_interleaved(contenders, a.rounds, a.warmup, device)
    base = res["all"].get("median_ms")
    print(f"{a.model} ({a.router}) training step, batch {a.batch}, {a.precision}, {torch.get_num_threads()} threads, "
          f"median of {a.rounds} interleaved rounds")
    print("| contender | median | time / all | (max - min) / median of the rounds |")
    print("| --- | --- | --- | --- |")
    for name, r in res.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | |")
            continue
        times = r["times_ms"]
        spread = (max(times) - min(times)) / statistics.median(times)
        ratio = f"{r['median_ms'] / base:.2f}" if base else "-"
        print(f"| {name} | {r['median_ms']:.0f} ms | {ratio} | {100 * spread:.0f}% |")


if __name__ == "__main__":
    main()
