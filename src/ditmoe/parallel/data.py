"""Data-parallel layouts applied from outside the model: DDP, FSDP2 and expert parallel (+ DDP or FSDP2).

Gradient convention (every layout): after the backward of one global batch each parameter's
gradient equals the single-process gradient of the mean loss over the global batch, where each
process's loss is the mean over its own micro-batch (the balance loss is computed per process,
over that process's tokens: see docs/scaling.md).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from .expert import (apply_expert_parallel, expert_group, expert_parallel_groups,
                     expert_parallel_modules, expert_parameter_names)

MODES = ("none", "ddp", "fsdp", "ep", "ep_fsdp")


def wrap_model(model: nn.Module, mode: str, dist_info: Any, ep_size: int = 0,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply the layout `mode` to `model` (in place where the layout shards it); return the module to train.

    The optimizer must be built after this call (FSDP and expert parallelism replace parameters),
    over `model.parameters()`. `ep_size` (modes "ep", "ep_fsdp") is the expert-parallel group
    size; 0 means the whole world. `param_dtype` (the autocast dtype, or None for fp32) lets the
    FSDP layouts all-gather the blocks' weights in that dtype (see `_fully_shard`).
    """
    if mode == "none" and dist_info.world == 1:
        return model
    if mode in ("none", "ddp"):
        return _ddp(model, dist_info)
    if mode == "fsdp":
        _fully_shard(model, param_dtype=param_dtype)
        return model
    if mode in ("ep", "ep_fsdp"):
        ep_group, dp_group = expert_parallel_groups(ep_size or dist_info.world)
        apply_expert_parallel(model, ep_group)
        if mode == "ep_fsdp":
            from torch.distributed.device_mesh import DeviceMesh

            _fully_shard(model, expert_mesh=DeviceMesh.from_group(dp_group, dist_info.device.type),
                         param_dtype=param_dtype)
            return model
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, expert_parameter_names(model))
        wrapped = _ddp(model, dist_info)
        _ExpertGradSync(model, wrapped, dp_group).install()
        return wrapped
    raise ValueError(f"unknown parallel mode {mode!r}; choose one of {MODES}")


def _ddp(model: nn.Module, dist_info: Any) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    # Gradients as views into the all-reduce buckets: no second copy of every gradient.
    # No buffer broadcast: the routers' buffers (topk_bias bias, race threshold) change only in
    # `update_routers`, identically on every rank after a sum over processes, and their per-rank
    # accumulators (load counts of this rank's micro-batches) must not be overwritten by rank 0's.
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)


def _fully_shard(model: nn.Module, expert_mesh: Any = None, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: one unit per block (all-gathered just in time, resharded after) plus the root.

    Under expert parallelism (`expert_mesh`: this rank's dp group) each layer's local experts are
    their own unit, sharded over the dp group only: the ranks holding the same experts. FSDP's
    reduce-scatter then sums their gradients over dp, and the divide factor world = dp x ep
    gives the mean-loss gradient (on each ep rank the autograd gradient already sums the
    contributions of the ep ranks' tokens). Every parameter is then a DTensor, so optimizer,
    EMA and clipping treat all of them alike.

    With `param_dtype` (mixed precision) the blocks' weights are all-gathered in that dtype:
    autocast would cast them to it anyway, but a cast of a gathered fp32 weight is saved for
    backward and lives until then (2 bytes x every parameter per GPU, defeating the sharding),
    while FSDP frees and re-gathers its own low-precision copy. Three things stay fp32, so the
    numerics are those of single-process autocast: the root's weights (pos_embed keeps the
    residual stream fp32), the routers (top-k on bf16-rounded router weights flips near ties)
    and every module's inputs (no cast_forward_inputs). Gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = {}
    if param_dtype is not None and param_dtype != torch.float32:
        low = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                 cast_forward_inputs=False)}
    if expert_mesh is not None:
        world = dist.get_world_size()
        for _, experts in expert_parallel_modules(model):
            fully_shard(experts, mesh=expert_mesh, **low)
            experts.set_gradient_divide_factor(float(world))
            if dist.get_backend() != "nccl":  # a custom factor uses NCCL's PREMUL_SUM; elsewhere SUM, then divide
                experts.set_force_sum_reduction_for_comms(True)
    for block in model.blocks:
        if low and block.is_moe:
            fully_shard(block.moe.gate)  # its own fp32 unit
        fully_shard(block, **low)
    fully_shard(model)


class _ExpertGradSync:
    """Under "ep" (DDP for the dense weights) gives the expert gradients the same convention.

    On ep rank q the autograd gradient of a local expert sums the contributions of the losses of
    all ep ranks (their tokens came to q). The mean-loss gradient over world = dp x ep processes
    is therefore (1/ep) x the dp-average of those sums: each contribution is scaled by 1/ep as it
    arrives (a tensor hook, so accumulation over micro-batches stays linear) and, when dp > 1 and
    gradients are being synchronised, the accumulated gradients are averaged over the dp group
    once at the end of the backward (an autograd-engine callback, which runs on every rank even
    where an expert got no tokens).
    """

    def __init__(self, model: nn.Module, wrapped: nn.Module, dp_group: Any):
        self.model, self.wrapped, self.dp_group = model, wrapped, dp_group
        self.params = [p for _, m in expert_parallel_modules(model) for p in m.parameters(recurse=False)]
        self.ep_size = next(m for _, m in expert_parallel_modules(model)).ep_size

    def install(self) -> None:
        for p in self.params:
            p.register_hook(lambda g: g / self.ep_size)
        if dist.get_world_size(self.dp_group) > 1:
            self.model.register_forward_hook(self._after_forward)

    def _sync_wanted(self) -> bool:
        return self.wrapped.require_backward_grad_sync  # DDP sets it False inside no_sync()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not (torch.is_grad_enabled() and self._sync_wanted()):
            return output
        first = output[0] if isinstance(output, tuple) else output
        hooked = _OnBackward.apply(first, self._queue_sync)
        return (hooked, *output[1:]) if isinstance(output, tuple) else hooked

    def _queue_sync(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._average_over_dp)

    def _average_over_dp(self) -> None:
        for p in self.params:
            if p.grad is None:  # this rank's experts were idle: its contribution is zero
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)  # SUM: gloo has no AVG
        flat /= dist.get_world_size(self.dp_group)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


class _OnBackward(torch.autograd.Function):
    """Identity whose backward calls `fn` (used to queue an end-of-backward callback)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.fn()
        return grad, None


def no_sync_if(model: nn.Module, skip: bool):
    """Under DDP, skip the gradient all-reduce on all but the last micro-batch of an accumulation.

    FSDP keeps reducing every micro-batch: skipping its reduce-scatter would make it hold the
    unsharded gradients of the whole model in between (4 bytes x every parameter on every GPU),
    the very memory FSDP is there to save. Its gradients accumulate sharded instead.
    """
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def shard_ema(ema_model: nn.Module, model: nn.Module, mode: str) -> None:
    """Give the EMA copy (made before wrapping) the same parameter layout as the wrapped `model`.

    The EMA is updated parameter by parameter from the live weights, so each rank keeps the EMA
    of exactly the slice it holds: no communication per step, and no full copy per rank under
    FSDP or expert parallelism. The EMA is never run forward while training.
    """
    if mode in ("ep", "ep_fsdp"):
        apply_expert_parallel(ema_model, expert_group(model))
    if mode == "fsdp":
        _fully_shard(ema_model)
    elif mode == "ep_fsdp":
        _, experts = next(expert_parallel_modules(model))
        _fully_shard(ema_model, expert_mesh=experts.w_in.device_mesh)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all ranks' distinct shards); returns the norm before clipping.

    DDP and FSDP2 leave this to torch (FSDP2's DTensor gradients know their sharding); under
    expert parallelism each ep rank holds different experts, so their squared norms are summed
    over the ep group (and under "ep_fsdp" the experts' DTensors live on another mesh than the
    dense ones, which torch's clip cannot combine).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    experts = {id(p) for _, m in expert_parallel_modules(model) for p in m.parameters(recurse=False)}
    if not experts:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    dense = [p.grad for p in params if id(p) not in experts]
    local = [p.grad for p in params if id(p) in experts]
    expert_sq = _total_norm(local) ** 2
    dist.all_reduce(expert_sq, group=expert_group(model))
    total = torch.sqrt(_total_norm(dense) ** 2 + expert_sq)
    # A host-side factor: the dense gradients may be DTensors (ep_fsdp) and the expert ones plain
    # tensors, which one foreach op cannot mix; one sync per optimizer step is negligible.
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for group in (dense, local):
            if group:
                torch._foreach_mul_(group, coef)
    return total


def _total_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    grads = list(grads)
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # DTensor (FSDP-sharded dense gradients)
        norm = norm.full_tensor()
    return norm.float()


__all__ = ["MODES", "wrap_model", "no_sync_if", "shard_ema", "clip_grad_norm_"]
