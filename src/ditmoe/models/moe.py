"""Sparse Mixture-of-Experts layer in three parts: a router, a dispatcher and the experts.

    y = combine(experts(dispatch(x, router(x)))) + shared_experts(x)

- The **router** (`TopKRouter`, official name `moe.gate`) maps token features to an
  `Assignment`: flat (token, expert, weight) pairs, the router's probabilities, and for top-k
  routing the k. It also computes its auxiliary (balance) loss and routing statistics.
- The **dispatcher** (`Dispatcher`) copies each token once per pair into expert-contiguous rows,
  and after the experts weights each row by its pair's weight and sums the rows back per token.
  It is the one place that knows about permutations.
- The **experts** (`Experts`) hold the E expert MLPs as stacked tensors and run them on the
  contiguous groups: one grouped product per projection (`torch._grouped_mm`) where the backend
  has it, else a loop over the groups.

Everything here is plain PyTorch, dropless and the same in training and inference. Faster
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


# ------------------------------------------------------------------------------- router
class Assignment(NamedTuple):
    """Which experts each of T tokens goes to, as P flat (token, expert, weight) pairs.

    A token may have any number of pairs (zero included); the dispatcher needs nothing more.
    Top-k routing is the special case `k` > 0: exactly k pairs per token, numbered slot-major
    (pair s * T + t is token t's s-th choice), so `expert_ids` / `weights` view them as (T, k).
    A named tuple, so module hooks that walk outputs (DeepSpeed ZeRO-3's) see its tensors.
    """

    token: torch.Tensor  # (P,) int64
    expert: torch.Tensor  # (P,) int64
    weight: torch.Tensor  # (P,) the pair's gate weight (fp32)
    probs: torch.Tensor  # (T, E) the router's probabilities (fp32), for the balance loss
    k: int = 0  # > 0: top-k, slot-major

    @classmethod
    def top_k(cls, expert_ids: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor) -> "Assignment":
        """From top-k choices expert_ids (T, k) and their weights (T, k)."""
        t, k = expert_ids.shape
        token = torch.arange(t, device=expert_ids.device).repeat(k)
        return cls(token, expert_ids.t().reshape(-1), weights.t().reshape(-1), probs, k)

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def expert_ids(self) -> torch.Tensor:
        """(T, k) chosen experts of a top-k assignment."""
        return self.expert.view(self.k, -1).t()

    @property
    def weights(self) -> torch.Tensor:
        """(T, k) gate weights of a top-k assignment."""
        return self.weight.view(self.k, -1).t()


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert (E,) int64, on the device.

    A scatter-add rather than `torch.bincount`, whose data-dependent output size breaks the
    torch.compile graph at every MoE layer.
    """
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, alpha: float) -> torch.Tensor:
    """Expert-level balance loss (paper Eq. 5) over the T tokens of `probs` (T, E).

    L = alpha * sum_i f_i * P_i with f_i = E / P * #pairs that chose i (P = k T for top-k) and
    P_i = mean_t p_t,i. `expert_ids` holds the chosen experts, any shape ((T, k) or (P,)).
    """
    counts = expert_counts(expert_ids, num_experts).to(probs.dtype)
    f = counts * (num_experts / expert_ids.numel())
    return alpha * (f * probs.mean(dim=0)).sum()


BalanceLoss = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]


class Router(nn.Module):
    """The router interface: `forward(x (T, D), cond=None) -> Assignment`, `balance_loss(a)`
    (scalar fp32), `counts(a)` (pairs per expert). `cond` carries optional conditioning (labels,
    time) for routing rules that use it; the top-k router ignores it."""

    num_experts: int

    def balance_loss(self, a: Assignment) -> torch.Tensor:
        raise NotImplementedError

    def counts(self, a: Assignment) -> torch.Tensor:
        return expert_counts(a.expert, self.num_experts)


class TopKRouter(Router):
    """Linear D -> E (no bias), softmax, top-k. Official name: `moe.gate`, parameter `weight` (E, D).

    `loss_fn` computes the balance loss from (probs, expert ids, E, alpha); `balance_loss` by
    default. `ditmoe.parallel.attach_global_balance` replaces it with one over all processes.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk: bool, aux_alpha: float = 0.01):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk, self.aux_alpha = num_experts, top_k, norm_topk, aux_alpha
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear, as the official gate
        self.loss_fn: BalanceLoss = balance_loss

    def forward(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        # Routing is computed in fp32 even under autocast: bf16 logits flip near-tied top-k
        # choices, and the router is a negligible share of the FLOPs.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        topk_w, topk_idx = torch.topk(probs, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk and self.top_k > 1:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        return Assignment.top_k(topk_idx, topk_w, probs)

    def balance_loss(self, a: Assignment) -> torch.Tensor:
        if self.aux_alpha <= 0:
            return a.probs.new_zeros(())
        return self.loss_fn(a.probs, a.expert, self.num_experts, self.aux_alpha)


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
RouteObserver = Callable[["MoE", torch.Tensor, torch.Tensor], None]


class MoE(nn.Module):
    """Routed experts plus an always-on shared expert: y = sum_k w_k E_k(x) + S(x)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int, shared_hidden: int,
                 kind: str = "swiglu", norm_topk: bool = False, aux_alpha: float = 0.01):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate: Router = TopKRouter(dim, num_experts, top_k, norm_topk, aux_alpha)
        self.dispatcher = Dispatcher()
        self.experts = Experts(num_experts, dim, hidden, kind)
        # The official "2 shared experts" are one SwiGLU of width 2*D, added without a gate weight.
        self.shared_experts = SwiGLU(dim, shared_hidden) if shared_hidden > 0 else None
        # Set by analysis.RoutingRecorder for the duration of a `with` block; called with
        # (self, expert ids (N, T, k), weights (N, T, k)).
        self.observer: RouteObserver | None = None

    def forward(self, x: torch.Tensor, cond: Any = None, return_aux: bool = False):
        """x (N, T, D) -> (N, T, D); with return_aux also the balance loss (scalar, fp32)."""
        n, t, d = x.shape
        flat = x.reshape(n * t, d)
        a = self.gate(flat, cond)
        if self.observer is not None:
            self.observer(self, a.expert_ids.view(n, t, -1), a.weights.view(n, t, -1))
        rows, plan = self.dispatcher.dispatch(flat, a)
        y = self.dispatcher.combine(self.experts(rows, plan.groups), plan, a).view(n, t, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return (y, self.gate.balance_loss(a)) if return_aux else y
