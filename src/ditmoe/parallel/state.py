"""Full (single-process) model and optimizer state dicts under every layout, and loading them back.

Checkpoints always hold what a single-process run would hold: the model's `state_dict()` with
every expert, and the optimizer's native `state_dict()` (per-parameter state keyed by the
parameter's index in `model.parameters()` order). A checkpoint saved under any layout therefore
loads under any other, single-process included.

Under FSDP and expert parallelism the full state is materialised on rank 0 only (the writer),
to keep the other ranks' host memory free; what other ranks get is incomplete. Every function
here is collective under FSDP and expert parallelism: every rank must call it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .expert import (expert_parallel_modules, gather_dim0, gather_expert_optimizer_state, gather_expert_state,
                     is_expert_parallel, shard_expert_optimizer_state, shard_expert_state)

_FSDP = ("fsdp", "ep_fsdp")


def full_model_state(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The single-process state dict of `model` (the unwrapped module), on the CPU."""
    if mode in _FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return gather_expert_state(model, sd, copy=False) if is_expert_parallel(model) else sd
    if is_expert_parallel(model):
        return gather_expert_state(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> dict[str, Any]:
    """The optimizer state dict a single-process run would have (index-keyed, full expert tensors)."""
    if mode in _FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = _names_to_indices(by_name, _optimizer_param_names(model, optimizer)) if by_name else {}
    else:
        sd = optimizer.state_dict()
    return gather_expert_optimizer_state(model, optimizer, sd) if is_expert_parallel(model) else sd


def load_full_model_state(model: nn.Module, sd: dict[str, torch.Tensor], mode: str) -> None:
    """Load a single-process state dict into `model` under its layout (every rank passes the full dict)."""
    if is_expert_parallel(model):
        sd = shard_expert_state(model, sd)
    if mode in _FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    from ..weights_io import load_into

    load_into(model, sd)


# How the optimizer runs, not what it computes: kept from the optimizer being loaded into, so a
# checkpoint of a fused single-process AdamW loads into FSDP's default one and the other way round.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _keep_implementation(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    groups = [{**saved, **{k: own[k] for k in _IMPLEMENTATION_KEYS if k in own}}
              for saved, own in zip(sd["param_groups"], optimizer.param_groups)]
    return {**sd, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any], mode: str) -> None:
    """Load a single-process optimizer state dict under the model's layout."""
    sd = _keep_implementation(optimizer, sd)
    if is_expert_parallel(model):
        sd = shard_expert_optimizer_state(model, optimizer, sd)
    if mode in _FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        by_name = _indices_to_names(sd, _optimizer_param_names(model, optimizer))
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(sd)


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as one process holding the whole model sees it (collective).

    FSDP-sharded gradients are all-gathered, expert-parallel ones gathered over the ep group;
    for comparing layouts (tests) and debugging. Parameters without a gradient are left out.
    """
    from .deepspeed_engine import is_deepspeed_model

    if is_deepspeed_model(model):
        from .deepspeed_engine import full_gradients as deepspeed_gradients

        return deepspeed_gradients(model)
    owners = {id(p): m for _, m in expert_parallel_modules(model) for p in m.parameters(recurse=False)}
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        if id(p) in owners:
            g = gather_dim0(g, owners[id(p)].group)  # makes FSDP shards whole first
        elif hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = g.detach().cpu().clone()
    return out


# ------------------------------------------------------------------ optimizer key formats
# torch.distributed.checkpoint keys optimizer state by parameter name; the native (and the
# single-process checkpoint) format keys it by the parameter's position in the param groups.
def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            out.append(names[id(p)])
    return out


def _names_to_indices(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: s for n, s in sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]],
    }


def _indices_to_names(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {
        "state": {names[int(i)]: s for i, s in sd["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]],
    }


__all__ = ["full_gradients", "full_model_state", "full_optimizer_state", "load_full_model_state", "load_full_optimizer_state"]
