"""Sparse Mixture-of-Experts layer in three parts: a router, a dispatcher and the experts.

    y = combine(experts(dispatch(x, router(x)))) + shared_experts(x)

- The **router** (official name `moe.gate`; the rules live in `ditmoe.models.routers`, one
  class each, `TopKRouter` by default) maps token features to an `Assignment`: flat (token,
  expert, weight) pairs, the router's probabilities, and for top-k routing the k. It also
  computes its auxiliary (balance) loss and routing statistics.
- The **dispatcher** (`Dispatcher`) copies each token once per pair into expert-contiguous rows,
  and after the experts weights each row by its pair's weight and sums the rows back per token.
  It is the one place that knows about permutations.
- The **experts** (`Experts`) hold the E expert MLPs as stacked tensors and run them on the
  contiguous groups: one grouped product per projection (`torch._grouped_mm`) where the backend
  has it, else a loop over the groups.

Everything here is plain PyTorch; the dispatcher and experts are dropless and the same in
training and inference (what a router decides may differ: see docs/routing.md). Faster
equivalents of the dispatcher and experts (padding, custom backward passes, fused CPU kernels)
live in `ditmoe.kernels`, expert parallelism and the balance loss over processes in
`ditmoe.parallel`; both are applied to a built model from outside.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import SwiGLU, compute_dtype
from .routers import (Assignment, BalanceLoss, Router, TopKRouter, balance_loss, build_router,  # noqa: F401
                      expert_counts)


# ---------------------------------------------------------------------------- dispatcher
class Groups(NamedTuple):
    """How the dispatched rows are grouped: counts (E,) rows per expert, contiguous, in expert
    order. `equal_rows` > 0 says every group holds exactly that many rows (a padding dispatcher
    of `ditmoe.kernels` sets it); the counts say the same, so reading it is optional."""

    counts: torch.Tensor
    equal_rows: int = 0


class DispatchPlan(NamedTuple):
    row_pair: torch.Tensor  # (P,) the pair each expert row holds
    groups: Groups


class Dispatcher(nn.Module):
    """Pairs of an `Assignment` to expert-contiguous rows and back."""

    def dispatch(self, x: torch.Tensor, a: Assignment) -> tuple[torch.Tensor, DispatchPlan]:
        """x (T, D) -> rows (P, D), the token of each pair, grouped by expert (stably: in pair order)."""
        row_pair = torch.argsort(a.expert, stable=True)
        counts = expert_counts(a.expert, a.num_experts)
        return x.index_select(0, a.token.index_select(0, row_pair)), DispatchPlan(row_pair, Groups(counts))

    def combine(self, rows: torch.Tensor, plan: DispatchPlan, a: Assignment) -> torch.Tensor:
        """rows (P, D) -> (T, D): each row times its pair's weight, summed per token (in rows' dtype)."""
        w = a.weight.index_select(0, plan.row_pair).to(rows.dtype)
        out = rows.new_zeros(a.num_tokens, rows.shape[-1])
        return out.index_add_(0, a.token.index_select(0, plan.row_pair), rows * w.unsqueeze(1))


# ------------------------------------------------------------------------------- experts
def grouped_product(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool = True) -> torch.Tensor:
    """Rows of `a` (M, K), grouped contiguously by expert (counts (E,)), times that expert's b[e] (K, N).

    `torch._grouped_mm` where the backend has it (then the counts stay on the device), else a
    loop over the groups, which reads the counts on the host.
    """
    if use_grouped_mm and grouped_mm_supported(a, b):
        return torch._grouped_mm(a, b, offs=torch.cumsum(counts, 0).to(torch.int32))
    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            pieces.append(a[start:start + n] @ b[e])
        start += n
    return torch.cat(pieces) if pieces else a.new_zeros(0, b.shape[-1])


def grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` has a kernel for these operands (eagerly)."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if a.device.type == "cpu":  # no float64 kernel
        return a.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if a.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(a.device)
        # Row strides must be 16-byte aligned for the CUDA kernels.
        return major >= 9 and a.dtype == torch.bfloat16 and a.shape[-1] % 8 == 0 and b.shape[-1] % 8 == 0
    return False


class Experts(nn.Module):
    """E expert MLPs stored as stacked tensors in `x @ W` layout.

    swiglu: w_in (E, D, 2H) holds [gate | up], w_out (E, H, D); no biases (official DiT-MoE).
    gelu:   w_in (E, D, H) + b_in (E, H), w_out (E, H, D) + b_out (E, D) (original DiT MLP).
    `grouped_mm=False` runs the loop over groups even where `torch._grouped_mm` exists.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, kind: str, grouped_mm: bool = True):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.kind = num_experts, dim, hidden, kind
        self.grouped_mm = grouped_mm
        in_width = 2 * hidden if kind == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, in_width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        if kind == "gelu":
            self.b_in = nn.Parameter(torch.zeros(num_experts, hidden))
            self.b_out = nn.Parameter(torch.zeros(num_experts, dim))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.w_in.is_meta:
            return
        # Xavier-uniform per expert and per projection, as the official per-expert nn.Linear init.
        bound = math.sqrt(6.0 / (self.dim + self.hidden))
        self.w_in.uniform_(-bound, bound)
        self.w_out.uniform_(-bound, bound)
        if self.b_in is not None:
            self.b_in.zero_()
            self.b_out.zero_()

    def row_experts(self, groups: Groups, rows: int) -> torch.Tensor:
        """(M,) expert of each row."""
        ids = torch.arange(groups.counts.numel(), device=groups.counts.device)
        return torch.repeat_interleave(ids, groups.counts, output_size=rows)

    def forward(self, xs: torch.Tensor, groups: Groups) -> torch.Tensor:
        """xs (M, D), grouped by expert as `groups` says -> (M, D), in the compute dtype."""
        dt = compute_dtype(xs)
        xs, w_in, w_out = xs.to(dt), self.w_in.to(dt), self.w_out.to(dt)
        h = grouped_product(xs, w_in, groups.counts, self.grouped_mm)  # (M, 2H) or (M, H)
        if self.kind == "swiglu":
            a = F.silu(h[:, :self.hidden]) * h[:, self.hidden:]
        else:
            row_expert = self.row_experts(groups, xs.shape[0])
            a = F.gelu(h + self.b_in.to(dt).index_select(0, row_expert), approximate="tanh")
        out = grouped_product(a, w_out, groups.counts, self.grouped_mm)
        if self.b_out is not None:
            out = out + self.b_out.to(dt).index_select(0, row_expert)
        return out


# ----------------------------------------------------------------------------------- MoE
RouteObserver = Callable[["MoE", Assignment, int], None]


class MoE(nn.Module):
    """Routed experts plus an always-on shared expert: y = sum over pairs w E_e(x) + S(x).

    `router` chooses the routing rule (`ditmoe.models.routers.build_router`); without it, the
    top-k softmax router of DiT-MoE with `top_k`, `norm_topk` and `aux_alpha`.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int, shared_hidden: int,
                 kind: str = "swiglu", norm_topk: bool = False, aux_alpha: float = 0.01, router: Router | None = None):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate: Router = router if router is not None else TopKRouter(dim, num_experts, top_k, norm_topk, aux_alpha)
        self.dispatcher = Dispatcher()
        self.experts = Experts(num_experts, dim, hidden, kind)
        # The official "2 shared experts" are one SwiGLU of width 2*D, added without a gate weight.
        self.shared_experts = SwiGLU(dim, shared_hidden) if shared_hidden > 0 else None
        # Set by analysis.RoutingRecorder / train.progress.ExpertLoadTracker for the duration of a
        # `with` block; called with (self, the Assignment of the N * T tokens, N images), the
        # tokens numbered image-major (token i * T + j is image i's token j).
        self.observer: RouteObserver | None = None

    def forward(self, x: torch.Tensor, cond: Any = None, return_aux: bool = False):
        """x (N, T, D) -> (N, T, D); with return_aux also the balance loss (scalar, fp32)."""
        n, t, d = x.shape
        flat = x.reshape(n * t, d)
        a = self.gate.route(x, cond)
        if self.observer is not None:
            self.observer(self, a, n)
        rows, plan = self.dispatcher.dispatch(flat, a)
        y = self.dispatcher.combine(self.experts(rows, plan.groups), plan, a).view(n, t, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return (y, self.gate.balance_loss(a)) if return_aux else y
