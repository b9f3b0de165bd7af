"""Sharded checkpoints under every layout: each rank writes and reads only what it holds.

`save_sharded` / `load_sharded` move the model, its EMA copy and the optimizer through
`torch.distributed.checkpoint` (DCP). The state dicts come from DCP's own
`get_state_dict` / `set_state_dict`: under FSDP2 every parameter and AdamW moment is a DTensor
shard and DCP records where it sits in the global tensor; plain (replicated) tensors are written
once. Nothing is gathered on any rank. The file layout is in `dcp_files`.

Expert parallelism needs one step more. Its expert tensors carry the single-process names but
only E/ep experts each (and under "ep_fsdp" they are DTensors sharded over the dp group only), so
to DCP they would look like one replicated tensor of the wrong size. `_expert_view` describes
each as a DTensor of the full (E, ...) tensor on a 2-D mesh (ep, dp) of the world's ranks: Shard(0)
over ep (rank r of an ep group holds experts r*E/ep ...), then over dp Shard(0) under "ep_fsdp"
(FSDP2 chunks dim 0 as DTensor does) or Replicate under "ep". The view shares the local storage,
so DCP writes and reads the parameters and moments themselves.

Since every tensor is stored as its global tensor under its single-process name, a checkpoint
written under any layout loads under any other: DCP cuts the chunks each rank needs.
Every function here is collective where a process group exists: every rank calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .dcp_files import dcp_error, single_process_quiet
from .expert import expert_parallel_modules, is_expert_parallel

# How the optimizer runs, not what it computes (see state._keep_implementation): kept from the
# optimizer being loaded into.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _expert_mesh(model: nn.Module, device_type: str):
    """The (ep, dp) mesh of the world's ranks: ep groups are consecutive ranks (see
    expert.expert_parallel_groups), so ep rank e of dp index d is global rank d * ep + e.

    The mesh only places each rank's slice in the global tensor for DCP's metadata; nothing
    communicates over it, so no process groups are created for it (`_init_backend=False`). Its
    device type is the tensors' (DTensor.from_local would move a tensor to another device)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    _, mod = next(expert_parallel_modules(model))
    world, ep = dist.get_world_size(), mod.ep_size
    ranks = torch.arange(world).view(world // ep, ep).t()
    return DeviceMesh(device_type, ranks, _init_backend=False, _rank=dist.get_rank())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _expert_view(t: torch.Tensor, mod: Any, mesh: Any) -> torch.Tensor:
    """`t` (a local expert parameter or AdamW moment) as a DTensor of the full (E, ...) tensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    local = _local(t)
    shape = (mod.num_global_experts, *t.shape[1:])  # t.shape: the ep slice (a DTensor's is its global shape)
    placements = [Shard(0), Shard(0) if hasattr(t, "to_local") else Replicate()]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def _expert_keys(model: nn.Module) -> dict[str, Any]:
    """Qualified name -> owning expert-parallel module, for every expert parameter."""
    return {f"{prefix}.{name}": mod for prefix, mod in expert_parallel_modules(model)
            for name, _ in mod.named_parameters(recurse=False)}


def _with_expert_views(model: nn.Module, model_sd: dict[str, Any], optim_sd: dict[str, Any] | None) -> list:
    """Replace, in place, the expert entries of the DCP state dicts by their full-tensor views;
    returns (container, key, original) for each, to put the originals back after a load."""
    if not is_expert_parallel(model):
        return []
    owners, meshes = _expert_keys(model), {}
    replaced = []
    for key, mod in owners.items():
        entries = [(model_sd, key)] if key in model_sd else []
        state = (optim_sd or {}).get("state", {}).get(key, {})
        entries += [(state, k) for k, v in state.items()
                    if torch.is_tensor(v) and v.ndim and v.shape[0] == mod.num_experts]  # moments, not the step count
        for container, k in entries:
            t = container[k]
            device = _local(t).device.type
            if device not in meshes:
                meshes[device] = _expert_mesh(model, device)
            replaced.append((container, k, t))
            container[k] = _expert_view(t, mod, meshes[device])
    return replaced


def _state_dicts(model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list]:
    """{"model", "ema", "optimizer"} as DCP state dicts (sharded where the layout shards), and the
    expert entries replaced by views (see `_with_expert_views`)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # creates AdamW's moments if none exist yet
    ema_sd = get_model_state_dict(ema_model)
    replaced = _with_expert_views(model, model_sd, optim_sd) + _with_expert_views(ema_model, ema_sd, None)
    return {"model": model_sd, "ema": ema_sd, "optimizer": optim_sd}, replaced


def save_sharded(folder: str | Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's shards of model, EMA and optimizer into `folder` (collective).

    `folder` must exist (on a file system every rank sees). DCP's `.metadata` is written last, by
    rank 0, after every rank's shards: a folder without it is incomplete.
    """
    import torch.distributed.checkpoint as dcp

    sd, _ = _state_dicts(model, ema_model, optimizer)
    with single_process_quiet():  # one process without a process group writes every shard itself
        dcp.save(sd, checkpoint_id=str(folder))


def load_sharded(folder: str | Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read `folder` into model, EMA and optimizer under their layout (collective); each rank
    reads the chunks of what it holds. A missing or damaged shard is a ShardedCheckpointError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    sd, replaced = _state_dicts(model, ema_model, optimizer)
    try:
        with single_process_quiet():
            dcp.load(sd, checkpoint_id=str(folder))
    except (Exception, dcp.CheckpointException) as e:  # DCP's (every rank gets it): a missing or short shard
        raise dcp_error(folder, e) from None
    # The expert views share storage with the expert slices (DTensor.from_local does not copy on
    # the tensor's own device), so DCP has written those; the copy is there should a view ever be
    # a copy. set_*_state_dict then takes the slices in the layout's own form again.
    for container, key, original in replaced:
        read, own = _local(container[key]), _local(original)
        if read.data_ptr() != own.data_ptr():
            own.copy_(read)
        container[key] = original
    for saved, own in zip(sd["optimizer"]["param_groups"], optimizer.param_groups):
        saved.update({k: own[k] for k in _IMPLEMENTATION_KEYS if k in own})
    set_model_state_dict(model, sd["model"])
    set_model_state_dict(ema_model, sd["ema"])
    set_optimizer_state_dict(model, optimizer, sd["optimizer"])


__all__ = ["save_sharded", "load_sharded"]
