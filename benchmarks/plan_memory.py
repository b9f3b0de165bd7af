"""Check the planner's memory model against a real GPU (one CUDA device).

    PYTHONPATH=src python benchmarks/plan_memory.py [--depth 4] [--micro 4 16] [--predict-only]

Builds DiT-MoE-G/2-16E2A at full width with fewer blocks (the per-layer numbers are what the
plan extrapolates), trains one step in bf16 autocast as the trainer does (fp32 weights, AdamW,
an fp32 EMA copy), and prints, per micro-batch, the measured memory next to `ditmoe.plan`'s
prediction:
- forward increase: memory held after the forward (saved activations + autocast's bf16 weight
  copies) vs. the plan's working copies + activations;
- peak: `torch.cuda.max_memory_allocated` over forward + backward + optimizer step vs. the plan's
  one-GPU peak (20 bytes per parameter of state + the larger of working copies + activations
  and the optimizer step's temporaries).
`--predict-only` prints the predictions without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="DiT-MoE-G/2-16E2A")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--predict-only", action="store_true")
    args = ap.parse_args()

    from ditmoe import kernels
    from ditmoe.models.dit import DiT
    from ditmoe.plan import PlanInput, plan
    from ditmoe.registry import get_config

    latent = args.image_size // 8
    cfg = get_config(args.model).replace(depth=args.depth, input_size=latent)
    gib = 2.0 ** 30

    def predicted(micro: int) -> dict:
        one_gpu = {p.layout: p for p in plan(PlanInput(cfg, gpus=1, batch=micro, image_size=args.image_size))}["ddp"]
        return {"predicted_forward_increase_gib": one_gpu.working + one_gpu.activations,
                "activations_predicted_gib": one_gpu.activations, "predicted_peak_gib": one_gpu.total_no_ckpt}

    if args.predict_only:
        for micro in args.micro:
            print(json.dumps({"micro_batch": micro, **predicted(micro)}))
        return
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = kernels.apply(DiT(cfg).to(dev))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    results = []
    for micro in args.micro:
        x = torch.randn(micro, 4, latent, latent, device=dev)
        t = torch.rand(micro, device=dev)
        y = torch.randint(0, 1000, (micro,), device=dev)
        for attempt in range(2):  # the second pass has the optimizer state and grads allocated
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, aux = model(x, t, y, return_aux=True)
                loss = (out[:, :4].float() - x).pow(2).mean() + aux.sum()
            torch.cuda.synchronize()
            after_forward = torch.cuda.memory_allocated()
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-4)
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        row = {
            "micro_batch": micro, "tokens": micro * cfg.num_patches, "parameters": n_params,
            "forward_increase_gib": (after_forward - base) / gib, "peak_gib": peak / gib,
            "state_before_forward_gib": base / gib, **predicted(micro),
        }
        results.append(row)
        print(json.dumps(row))
    from ditmoe.hardware import cpu_info

    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": cfg.name,
                      "depth": cfg.depth, "cpu": cpu_info().as_dict()}))


if __name__ == "__main__":
    main()
