"""`ditmoe plan`: per-GPU memory and traffic of each parallel layout."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ._command import Command


# ------------------------------------------------------------------------------ plan
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name, e.g. DiT-MoE-G/2-16E2A")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--batch", type=int, default=1024, help="global batch (images per optimizer step)")
    p.add_argument("--micro-batch", type=int, default=0, help="images per forward per GPU (0: batch / gpus)")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel group size for the EP layouts")
    p.add_argument("--checkpointing", action="store_true", help="judge the fit with activation checkpointing")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (latent = image / 8)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free")
    p.add_argument("--imbalance", type=float, default=1.0, help="busiest GPU's routed rows / the average (EP)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _plan(args: argparse.Namespace) -> int:
    from ..plan import PlanInput, format_plan, param_counts, plan
    from ..registry import get_config

    inp = PlanInput(get_config(args.model), gpus=args.gpus, gpu_mem_gib=args.gpu_mem, batch=args.batch,
                    micro_batch=args.micro_batch, ep=args.ep, checkpointing=args.checkpointing,
                    precision=args.precision, image_size=args.image_size, gpus_per_node=args.gpus_per_node,
                    headroom=args.headroom, imbalance=args.imbalance)
    plans = plan(inp)
    if args.json:
        counts = param_counts(inp.model)
        print(json.dumps({"parameters": dataclasses.asdict(counts), "layouts": [p.to_dict() for p in plans]}, indent=2))
    else:
        print(format_plan(inp, plans))
    return 0


COMMANDS = [
    Command("plan", "per-GPU memory and traffic of each parallel layout (DDP, FSDP, EP) for a model on N GPUs",
            _plan_args, _plan),
]
