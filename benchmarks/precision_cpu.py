"""fp32 against bf16 autocast for one training step, by model width, on this machine.

Whole training steps of small DiT-MoE models, for a closer look than the short probe with which
`--precision auto` decides on a CPU with bf16 instructions (`python -m ditmoe.precision`): for
small models the per-op casts of autocast can cost more than faster bf16 products save.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/precision_cpu.py [--batch 128] [--repeats 5]

Prints the median step time of each width in both precisions and their ratio; both precisions
are interleaved step by step so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from ditmoe import create_model, kernels
from ditmoe.diffusion.flow import RectifiedFlow

WIDTHS = {  # hidden size -> (heads, depth, tokens side)
    96: (4, 4, 8),
    192: (6, 6, 8),
    384: (6, 4, 16),
}


def step_fn(model, opt, x, y, bf16: bool):
    proc = RectifiedFlow()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = proc.training_losses(lambda a, t, y: model(a, t, y, return_aux=True), x, model_kwargs={"y": y})
            loss = terms["loss"].mean() + terms["aux"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from ditmoe.hardware import cpu_info

    cpu = cpu_info()
    print(f"{cpu.model_name} (flags {cpu.flag_string()}, {cpu.cores} cores), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}")
    for d, (heads, depth, side) in WIDTHS.items():
        torch.manual_seed(0)
        model = kernels.apply(create_model("DiT-MoE-mnist", hidden_size=d, num_heads=heads, depth=depth,
                                           expert_hidden=2 * d, shared_hidden=d, input_size=side * 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(args.batch, 1, side * 4, side * 4)
        y = torch.randint(0, 10, (args.batch,))
        runs = {"fp32": step_fn(model, opt, x, y, False), "bf16": step_fn(model, opt, x, y, True)}
        for f in runs.values():
            f()  # warm-up
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"D={d:4d} tokens={side * side:4d}: fp32 {med['fp32'] * 1e3:7.0f} ms  bf16 {med['bf16'] * 1e3:7.0f} ms  "
              f"bf16/fp32 {med['bf16'] / med['fp32']:.2f}")


if __name__ == "__main__":
    main()
