"""The official DiT-MoE MoE layer, re-implemented as the speed and memory baseline.

This is the algorithm of the official code (feizc/DiT-MoE, itself DeepSeek-MoE's layer), written
from its description so that the benchmark compares this package against what users of the
official repository actually run:

- router: linear D -> E without bias, softmax, top-k (k = 2) unsorted, weights not renormalised;
  in training the balance loss ``alpha * sum_i (E * mean_t onehot_i) * mean_t p_i`` is computed
  and attached to the output with a custom autograd function whose backward feeds the loss a
  gradient of ones (`AddAuxiliaryLoss`);
- experts: E separate SwiGLU modules (`gate_proj`, `up_proj`, `down_proj`, nn.Linear without
  bias, hidden 4D), plus one shared SwiGLU of width 2D added to every token; the official
  expert MLP hard-codes ``pretraining_tp = 2`` (each projection split into two halves whose
  results are concatenated / summed), reproduced here with ``tp=2`` (``tp=1`` is the plain form);
- training path: the hidden states are copied k times (``repeat_interleave``), every expert
  runs on a boolean-masked gather of its rows and writes back through a masked assignment, then
  the k slots are weighted and summed;
- inference path (``moe_infer``): argsort of the flat expert ids, per-expert counts through the
  host (``bincount().cpu().numpy().cumsum()``), a Python loop over the experts' slices, and a
  ``scatter_reduce_(..., reduce="sum")`` into a zero cache.

`official_from_package` builds one of these from a `ditmoe.models.moe.MoE` with the same weights
(package layout ``x @ W``: experts.w_in (E, D, 2H) = [gate | up], experts.w_out (E, H, D); an
nn.Linear stores the transpose), and `officialize` swaps every MoE layer of a package DiT for
one, which gives the official model (the rest of the network is the same computation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialSwiGLU(nn.Module):
    """SwiGLU expert as the official ``MoeMLP`` (no biases; ``tp`` = its ``pretraining_tp``)."""

    def __init__(self, dim: int, hidden: int, tp: int = 2):
        super().__init__()
        if hidden % tp:
            raise ValueError(f"hidden {hidden} is not divisible by tp {tp}")
        self.hidden, self.tp = hidden, tp
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        part = self.hidden // self.tp
        gate_w = self.gate_proj.weight.split(part, dim=0)
        up_w = self.up_proj.weight.split(part, dim=0)
        down_w = self.down_proj.weight.split(part, dim=1)
        gate = torch.cat([F.linear(x, w) for w in gate_w], dim=-1)
        up = torch.cat([F.linear(x, w) for w in up_w], dim=-1)
        inter = (F.silu(gate) * up).split(part, dim=-1)
        return sum(F.linear(inter[i], down_w[i]) for i in range(self.tp))


class OfficialGate(nn.Module):
    """Softmax top-k router; in training also the balance loss (None otherwise)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, alpha: float = 0.01):
        super().__init__()
        self.num_experts, self.top_k, self.alpha = num_experts, top_k, alpha
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states: torch.Tensor):
        d = hidden_states.shape[-1]
        flat = hidden_states.view(-1, d)
        scores = F.linear(flat, self.weight, None).softmax(dim=-1)  # (T, E)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        aux_loss = None
        if self.training and self.alpha > 0.0:
            mask_ce = F.one_hot(topk_idx.view(-1), num_classes=self.num_experts)
            fi = mask_ce.float().mean(0) * self.num_experts
            pi = scores.mean(0)
            aux_loss = (pi * fi).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on x whose backward also hands the aux loss a gradient of ones (official trick)."""

    @staticmethod
    def forward(ctx, x, loss):
        assert loss.numel() == 1
        ctx.dtype = loss.dtype
        ctx.required_aux_loss = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output):
        grad_loss = None
        if ctx.required_aux_loss:
            grad_loss = torch.ones(1, dtype=ctx.dtype, device=grad_output.device)
        return grad_output, grad_loss


class OfficialMoE(nn.Module):
    """The official ``SparseMoeBlock``: routed SwiGLU experts plus one shared SwiGLU of width 2D.

    ``forward(x)`` returns y (N, T, D) like the official block. ``return_aux=True`` (what this
    package's DiTBlock asks for) returns ``(y, None)``: the official balance loss never leaves
    the layer, it reaches the gradients through `AddAuxiliaryLoss`. The last balance loss is kept
    in ``self.last_aux`` (detached) so tests can compare it.
    """

    def __init__(self, dim: int, num_experts: int = 8, top_k: int = 2, hidden: int | None = None,
                 shared_hidden: int | None = None, aux_alpha: float = 0.01, tp: int = 2):
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        shared_hidden = 2 * dim if shared_hidden is None else shared_hidden
        self.num_experts_per_tok = top_k
        self.gate = OfficialGate(dim, num_experts, top_k, aux_alpha)
        self.experts = nn.ModuleList([OfficialSwiGLU(dim, hidden, tp) for _ in range(num_experts)])
        self.shared_experts = OfficialSwiGLU(dim, shared_hidden, tp) if shared_hidden > 0 else None
        self.last_aux: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, cond: Any = None, return_aux: bool = False):
        """`cond` (the labels the package's blocks pass to every MoE layer) is unused: the
        official routing sees only the tokens."""
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.view(*orig_shape)
            # The official code applies this unconditionally (and so crashes at alpha = 0).
            if aux_loss is not None:
                y = AddAuxiliaryLoss.apply(y, aux_loss)
                self.last_aux = aux_loss.detach()
        else:
            y = self.moe_infer(hidden_states, flat_topk_idx, topk_weight.view(-1, 1)).view(*orig_shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(identity)
        return (y, None) if return_aux else y

    @torch.no_grad()
    def moe_infer(self, x: torch.Tensor, flat_expert_indices: torch.Tensor,
                  flat_expert_weights: torch.Tensor) -> torch.Tensor:
        expert_cache = torch.zeros_like(x)
        idxs = flat_expert_indices.argsort()
        tokens_per_expert = flat_expert_indices.bincount().cpu().numpy().cumsum(0)
        token_idxs = idxs // self.num_experts_per_tok
        for i, end_idx in enumerate(tokens_per_expert):
            start_idx = 0 if i == 0 else tokens_per_expert[i - 1]
            if start_idx == end_idx:
                continue
            expert = self.experts[i]
            exp_token_idx = token_idxs[start_idx:end_idx]
            expert_tokens = x[exp_token_idx]
            expert_out = expert(expert_tokens)
            expert_out.mul_(flat_expert_weights[idxs[start_idx:end_idx]])
            expert_cache.scatter_reduce_(0, exp_token_idx.view(-1, 1).repeat(1, x.shape[-1]), expert_out,
                                         reduce="sum")
        return expert_cache


@torch.no_grad()
def official_from_package(moe: nn.Module, tp: int = 2) -> OfficialMoE:
    """An `OfficialMoE` holding the weights of a package `MoE` (SwiGLU experts only)."""
    ex = moe.experts
    if getattr(ex, "kind", "swiglu") != "swiglu":
        raise ValueError("the official layer has SwiGLU experts only")
    e, d, two_h = ex.w_in.shape
    h = two_h // 2
    shared = moe.shared_experts
    shared_hidden = shared.gate_proj.out_features if shared is not None else 0
    norm_topk = getattr(moe.gate, "norm_topk", False)
    if norm_topk:
        raise ValueError("the official layer does not renormalise the top-k weights")
    dev, dt = ex.w_in.device, ex.w_in.dtype
    with torch.device(dev):
        off = OfficialMoE(d, e, moe.top_k, h, shared_hidden, aux_alpha=moe.gate.aux_alpha, tp=tp).to(dt)
    off.gate.weight.copy_(moe.gate.weight)
    for i, expert in enumerate(off.experts):
        expert.gate_proj.weight.copy_(ex.w_in[i, :, :h].t())
        expert.up_proj.weight.copy_(ex.w_in[i, :, h:].t())
        expert.down_proj.weight.copy_(ex.w_out[i].t())
    if shared is not None:
        off.shared_experts.load_state_dict(shared.state_dict())
    off.train(moe.training)
    return off


def officialize(model: nn.Module, tp: int = 2) -> nn.Module:
    """Swap, in place, every block's `.moe` of a package DiT for the official layer (same weights)."""
    for block in model.blocks:
        if hasattr(block, "moe"):
            block.moe = official_from_package(block.moe, tp)
    return model


class DenseBound(nn.Module):
    """The bound: one dense SwiGLU doing exactly the activated GEMM FLOPs of a MoE layer.

    Hidden width k * H + S (k routed experts of width H plus the shared expert of width S) over
    every token: the same multiply-accumulates as the routed and shared experts, without any
    routing, gathering or scattering.
    """

    def __init__(self, dim: int, top_k: int = 2, hidden: int | None = None, shared_hidden: int | None = None):
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        shared_hidden = 2 * dim if shared_hidden is None else shared_hidden
        width = top_k * hidden + shared_hidden
        self.gate_proj = nn.Linear(dim, width, bias=False)
        self.up_proj = nn.Linear(dim, width, bias=False)
        self.down_proj = nn.Linear(width, dim, bias=False)
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
