"""Everything distributed lives here; model code is written for one device (see design.md).

`wrap_model(model, mode, dist)` applies the layout from outside: "none", "ddp"
(DistributedDataParallel) or "fsdp" (FSDP2, `torch.distributed.fsdp.fully_shard` per block).
Checkpoints always hold full (unsharded) state dicts, so a checkpoint saved under any layout
loads under any other, single-process included.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def wrap_model(model: torch.nn.Module, mode: str, dist_info: Any) -> torch.nn.Module:
    if mode == "none" and dist_info.world == 1:
        return model
    if mode in ("none", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}")


def no_sync_if(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()


def full_model_state(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> dict[str, Any]:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], mode: str) -> None:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    from ..convert import load_into

    load_into(model, sd)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any], mode: str) -> None:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(sd)
