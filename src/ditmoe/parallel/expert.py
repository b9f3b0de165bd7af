"""Expert parallelism: the experts of every MoE layer are split across the ranks of an `ep` group.

Each rank keeps E/ep experts' stacked weights (rank r holds experts r*E/ep ... (r+1)*E/ep - 1) and
all the other (dense) weights. The MoE layer itself is unchanged (model code is written for one
device); `apply_expert_parallel` swaps each layer's `moe.experts` for an `ExpertParallelExperts`,
which has the same forward signature `(xs (M, D) grouped by expert, groups) -> (M, D)`, and the
layer's dispatcher for one that never pads (`FastDispatcher(exact=True)`). Inside, the experts

1. exchanges the per-expert row counts with one `all_to_all` (every rank learns how many rows it
   will receive for each of its experts from each source rank),
2. sends the rows with an uneven `all_to_all_single` (the MoE layer sorted them by expert, and a
   rank's experts are contiguous, so the rows for each destination are already contiguous),
3. regroups the received rows by local expert and runs the local experts (one grouped GEMM pair),
4. returns the results with the reverse `all_to_all_single`.

Autograd flows through the exchanges (`_AllToAll`: the backward is the reverse exchange). Every
rank takes part in every collective of every layer at every step, also when it sends or receives
no rows, so the collectives always match up.

State dicts keep the single-process names (`blocks.i.moe.experts.w_in`, ...); only the expert
tensors' first dimension is E/ep instead of E. `gather_expert_state` / `shard_expert_state` (and
the optimizer versions) convert between that and the full single-process state, so checkpoints
move freely between layouts.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from ..kernels.moe import FastDispatcher, FastExperts
from ..models.moe import Experts, Groups

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default (world) group


# ------------------------------------------------------------------------------ the exchange
class _AllToAll(torch.autograd.Function):
    """Rows of `x` split `in_splits` ways go to the group's ranks; `out_splits` rows come back.

    The backward is the same exchange with the splits swapped: the gradient of each received row
    goes back to the rank that sent it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_in = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup = None) -> torch.Tensor:
    """Differentiable uneven all-to-all over dim 0: send in_splits[r] rows to rank r, receive out_splits[r] from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


# ------------------------------------------------------------------------------ the module
class ExpertParallelExperts(FastExperts):
    """This rank's slice of a layer's `Experts`, plus the token exchange with the other ranks.

    A subclass, so the parameters keep their names and the local compute is the parent's forward
    (the `ditmoe.kernels` experts: cached casts, fused SwiGLU where they apply).
    `num_experts` is the local count; `num_global_experts` the layer's E.
    """

    def __init__(self, full: Experts, group: ProcessGroup = None):
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        if full.num_experts % ep:
            raise ValueError(f"{full.num_experts} experts cannot be split evenly over an expert-parallel group of {ep} "
                             "ranks; choose an ep size that divides the number of experts")
        local = full.num_experts // ep
        # Build the parent's structure without allocating or initialising full-size weights,
        # then adopt this rank's slice of the existing ones.
        with torch.device("meta"):
            super().__init__(local, full.dim, full.hidden, full.kind, grouped_mm=full.grouped_mm)
        self.fused = getattr(full, "fused", True)
        lo = rank * local
        for name, p in full.named_parameters(recurse=False):
            setattr(self, name, nn.Parameter(p.detach()[lo:lo + local].clone(), requires_grad=p.requires_grad))
        self.group, self.ep_size, self.ep_rank = group, ep, rank
        self.num_global_experts, self.first_expert = full.num_experts, lo

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.num_experts - 1} of "
                f"{self.num_global_experts} (ep rank {self.ep_rank} of {self.ep_size})")

    def forward(self, xs: torch.Tensor, groups: Groups) -> torch.Tensor:
        """xs (M, D) grouped by global expert id as `groups` says -> (M, D), as `Experts.forward`.

        The groups are exact (the layer's dispatcher never pads here). The dispatch has already
        cast the rows to the compute dtype, so the exchange moves bf16 under autocast."""
        ep, local, group = self.ep_size, self.num_experts, self.group
        send_counts = groups.counts.view(ep, local)  # [r, j]: rows for expert j of rank r
        recv_counts = torch.empty_like(send_counts)  # [s, j]: rows from rank s for my expert j
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
        # Split sizes must be host integers: the one host sync of expert parallelism.
        both = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = both[0], both[1]
        received = all_to_all(xs, recv_splits, send_splits, group)  # (R, D), grouped by (source, expert)

        # Regroup by local expert (stable: rows of one expert keep their source order).
        local_ids = torch.arange(local, device=xs.device).repeat(ep)  # expert of each (source, expert) block
        row_expert = torch.repeat_interleave(local_ids, recv_counts.reshape(-1), output_size=received.shape[0])
        order = torch.argsort(row_expert, stable=True)
        if received.shape[0]:
            ys = super().forward(received.index_select(0, order), Groups(recv_counts.sum(0)))
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            ys = ys.index_select(0, inverse)  # back to (source, expert) order
        else:
            ys = self._idle_output(received)
        return all_to_all(ys, send_splits, recv_splits, group)

    def _idle_output(self, received: torch.Tensor) -> torch.Tensor:
        """(0, D) output for a rank that received no rows, still connected to the local weights.

        Grouped GEMMs cannot back-propagate through zero rows, so skip them; the weights join the
        graph with a zero factor so they get a zero gradient (as an idle expert's slice of the
        stacked gradient is zero in the single-process model) rather than None, which the
        optimizer would treat differently (AdamW skips parameters without a gradient).
        """
        # The result must also depend on `received`: otherwise the exchange that produced it would
        # drop out of this rank's backward graph and its reverse all-to-all would never be matched.
        tie = sum(p.sum() for p in self.parameters()) * 0.0
        return received * 0.0 + tie.to(received.dtype)


# ------------------------------------------------------------------------------ applying it
def expert_parallel_modules(model: nn.Module) -> Iterator[tuple[str, ExpertParallelExperts]]:
    """(qualified name, module) of every expert-parallel experts module in `model`."""
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelExperts):
            yield name, mod


def is_expert_parallel(model: nn.Module) -> bool:
    return next(expert_parallel_modules(model), None) is not None


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the sharded (rank-local) expert parameters."""
    return [f"{prefix}.{name}" for prefix, mod in expert_parallel_modules(model)
            for name, _ in mod.named_parameters(recurse=False)]


def expert_group(model: nn.Module) -> ProcessGroup:
    """The ep process group the model's experts are sharded over."""
    found = next(expert_parallel_modules(model), None)
    if found is None:
        raise ValueError("the model has no expert-parallel layers (call apply_expert_parallel first)")
    return found[1].group


def apply_expert_parallel(model: nn.Module, group: ProcessGroup = None) -> nn.Module:
    """Shard the experts of every MoE layer of `model` over `group`, in place; returns `model`.

    Every rank must hold the same full model (same seed or the same checkpoint) when this is
    called; each keeps its own slice. The router, shared expert and all dense weights stay whole.
    """
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised (run under torchrun)")
    if is_expert_parallel(model):
        raise ValueError("the model's experts are already sharded")
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    if not layers:
        raise ValueError("expert parallelism needs a MoE model; this model has no MoE layers")
    for _, moe in layers:
        moe.experts = ExpertParallelExperts(moe.experts, group)
        moe.dispatcher = FastDispatcher(exact=True)
    return model


def expert_parallel_groups(ep_size: int) -> tuple[ProcessGroup, ProcessGroup]:
    """(ep group, dp group) of this rank for world = dp x ep.

    Consecutive ranks form an ep group (on one node, where the all-to-all traffic is cheapest);
    ranks holding the same expert slice (rank mod ep equal) form a dp group, over which the expert
    gradients are averaged. With ep == world the ep group is the default group (None) and the
    dp groups have one rank each.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size <= 0 or world % ep_size:
        raise ValueError(f"ep size {ep_size} must divide the world size {world}")
    ep_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for start in range(0, world, ep_size) if ep_size < world else ():
        g = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = g
    for offset in range(ep_size):
        g = dist.new_group(list(range(offset, world, ep_size)))
        if rank % ep_size == offset:
            dp_group = g
    return ep_group, dp_group


# ------------------------------------------------------------------------------ state dicts
def gather_dim0(t: torch.Tensor, group: ProcessGroup, to_writer: bool = False) -> torch.Tensor | None:
    """Concatenate every group rank's `t` along dim 0, in rank order (collective).

    A DTensor (an FSDP-sharded expert tensor under "ep_fsdp") is first made whole over its own
    mesh, the dp group (every rank takes part in that). With `to_writer` only global rank 0, the
    one that writes checkpoints, receives the result (others get None), and ep groups without
    rank 0 skip the exchange: at 16B parameters every rank holding full expert copies would
    cost hundreds of GB of host memory per node.
    """
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    t = t.contiguous()
    size = dist.get_world_size(group)
    if not to_writer:
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, dim=0)
    if group is not None and dist.get_global_rank(group, 0) != 0:
        return None  # this ep group's slices are also in rank 0's group (same experts, other data)
    parts = [torch.empty_like(t) for _ in range(size)] if dist.get_rank() == 0 else None
    dist.gather(t, parts, group=group, group_dst=0)
    return torch.cat(parts, dim=0) if parts is not None else None


def gather_expert_state(model: nn.Module, base: dict[str, torch.Tensor] | None = None,
                        copy: bool = True) -> dict[str, torch.Tensor]:
    """The full single-process state dict of an expert-parallel model, on the CPU of rank 0.

    Collective: every rank calls it. `base` (default `model.state_dict()`) supplies the
    non-expert entries (`copy` them to the CPU, unless they already are fresh CPU copies). The
    expert tensors are gathered one at a time from the modules' parameters and moved to the CPU
    at once, so no GPU holds more than one layer's full experts. Only global rank 0 gets them;
    elsewhere the expert entries are left out.
    """
    sd = dict(model.state_dict() if base is None else base)
    for prefix, mod in expert_parallel_modules(model):
        for name, p in mod.named_parameters(recurse=False):
            key = f"{prefix}.{name}"
            full = gather_dim0(p.detach(), mod.group, to_writer=True)
            if full is None:
                sd.pop(key, None)
            else:
                sd[key] = full.cpu()
                del full
    if copy:
        sd = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
    return sd


def shard_expert_state(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's state dict cut from a full single-process one (no communication)."""
    sd = dict(full)
    for prefix, mod in expert_parallel_modules(model):
        lo, n = mod.first_expert, mod.num_experts
        for name, _ in mod.named_parameters(recurse=False):
            key = f"{prefix}.{name}"
            if key in sd:
                if sd[key].shape[0] != mod.num_global_experts:
                    raise ValueError(f"{key}: expected {mod.num_global_experts} experts in the full state, "
                                     f"got shape {tuple(sd[key].shape)}")
                sd[key] = sd[key][lo:lo + n]
    return sd


def load_expert_parallel_state(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load a full single-process state dict into an expert-parallel model (each rank its slice)."""
    from ..weights_io import load_into

    load_into(model, shard_expert_state(model, full))


def _expert_param_slices(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, ExpertParallelExperts]:
    """Optimizer state-dict index -> owning EP module, for every expert parameter."""
    owner = {id(p): mod for _, mod in expert_parallel_modules(model) for p in mod.parameters(recurse=False)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}


def gather_expert_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                                  base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The optimizer's state dict as a single-process run would have it, complete on rank 0.

    Collective. `base` (default `optimizer.state_dict()`, index-keyed) supplies everything else;
    per-parameter state tensors of expert parameters (AdamW's exp_avg, exp_avg_sq) are gathered
    from the live optimizer state along the expert dimension to rank 0 (see `gather_dim0`);
    elsewhere they stay the local slices. Scalars such as `step` agree on every rank.
    """
    sd = optimizer.state_dict() if base is None else base
    # state_dict() shares the per-parameter dicts with the live optimizer: copy before replacing.
    state = {i: dict(s) for i, s in sd.get("state", {}).items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, mod in _expert_param_slices(model, optimizer).items():
        for key, value in sorted(optimizer.state.get(params[i], {}).items()):
            if torch.is_tensor(value) and value.ndim and value.shape[0] == mod.num_experts:
                full = gather_dim0(value.detach(), mod.group, to_writer=True)
                if full is not None:
                    state.setdefault(i, {})[key] = full.cpu()
    return {"state": state, "param_groups": sd.get("param_groups", [])}


def shard_expert_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                                 full: dict[str, Any]) -> dict[str, Any]:
    """This rank's optimizer state dict cut from a full single-process one."""
    state = {i: dict(s) for i, s in full["state"].items()}
    for i, mod in _expert_param_slices(model, optimizer).items():
        for key, value in state.get(i, {}).items():
            if torch.is_tensor(value) and value.ndim and value.shape[0] == mod.num_global_experts:
                state[i][key] = value[mod.first_expert:mod.first_expert + mod.num_experts]
    return {"state": state, "param_groups": full["param_groups"]}


__all__ = [
    "ExpertParallelExperts", "all_to_all", "gather_dim0", "apply_expert_parallel", "expert_parallel_groups",
    "expert_parallel_modules", "expert_parameter_names", "expert_group", "is_expert_parallel",
    "gather_expert_state", "shard_expert_state", "load_expert_parallel_state",
    "gather_expert_optimizer_state", "shard_expert_optimizer_state",
]
