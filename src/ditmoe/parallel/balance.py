"""The balance loss over the tokens of all data-parallel processes (`--balance-scope global`).

The model's routers compute Eq. 5 over their own process's batch (as the official code does).
`attach_global_balance(model, group)` replaces each router's loss function with one that first
sums the expert counts, token numbers and probability sums over the processes of `group`, so each
computes the loss of the union of their batches.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.routers import Router, expert_counts


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward is again an all-reduce (sum) of the incoming gradients.

    With every process holding the same loss and gradients averaged over processes, the gradient
    of the probability sums is then exactly that of the global loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def global_balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, alpha: float,
                        group: Any = None) -> torch.Tensor:
    """`ditmoe.models.moe.balance_loss` of the union of the batches of `group`'s processes.

    f_i = E / (pairs summed over processes) * (count of i summed over processes), P_i = (sum of
    p_t,i over processes) / (tokens summed over processes).
    """
    t = probs.shape[0]
    counts = expert_counts(expert_ids, num_experts).to(probs.dtype)
    counts_and_tokens = torch.cat([counts, counts.new_full((1,), float(t))])
    dist.all_reduce(counts_and_tokens, group=group)  # f_i is a count: no gradient flows through it
    counts, tokens = counts_and_tokens[:-1], counts_and_tokens[-1]
    prob_sum = _SumOverProcesses.apply(probs.sum(dim=0), group)
    # All pairs of all processes (k * tokens for top-k; routers with a variable number of experts
    # per token differ between processes).
    f = counts * num_experts / counts.sum().clamp_min(1.0)
    return alpha * (f * prob_sum / tokens).sum()


def attach_global_balance(model: nn.Module, group: Any = None) -> int:
    """Make every router of `model` compute its balance loss over `group` (None: the world
    group); returns how many routers it changed. Call after any deepcopy of the model (an EMA
    copy): process groups cannot be copied. Routers without a `loss_fn` raise TypeError."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, Router) and hasattr(mod, "loss_fn"):
            mod.loss_fn = functools.partial(global_balance_loss, group=group)
            n += 1
        elif isinstance(mod, Router):
            raise TypeError(f"no global balance loss for router {type(mod).__name__}")
    return n


def sum_over_processes(group: Any = None):
    """A function that sums a tensor over the processes of `group` (None: the world group), for
    `ditmoe.models.routers.update_routers`: the routers' load counts and cut-offs of the whole
    global batch."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t

    return reduce


__all__ = ["attach_global_balance", "global_balance_loss", "sum_over_processes"]
