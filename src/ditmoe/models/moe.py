"""Sparse Mixture-of-Experts layer: softmax top-k router, stacked experts, shared expert.

Dispatch is dropless and identical in training and inference: the (token, slot) pairs are sorted
by expert, every expert reads one contiguous slice, and the results are put back in token order.
Where the backend has a grouped matrix product (`torch._grouped_mm`: CPU in any float dtype, CUDA
bf16 on sm90+) the whole layer is two grouped GEMMs with no host synchronisation; elsewhere a loop
over the contiguous slices does the same arithmetic.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import SwiGLU


class Router(nn.Module):
    """Linear D -> E (no bias), softmax, top-k. Official name: `moe.gate`, parameter `weight` (E, D)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk: bool):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk = norm_topk
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear, as the official gate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> top-k ids (T, k) int64, top-k weights (T, k), probabilities (T, E) fp32."""
        # Routing is computed in fp32 even under autocast: bf16 logits flip near-tied top-k
        # choices, and the router is a negligible share of the FLOPs.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        topk_w, topk_idx = torch.topk(probs, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk and self.top_k > 1:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_w, probs


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert (E,) int64, on the device.

    A scatter-add rather than `torch.bincount`, whose data-dependent output size breaks the
    torch.compile graph at every MoE layer.
    """
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, alpha: float,
                 group: Any = None) -> torch.Tensor:
    """Expert-level balance loss (paper Eq. 5) over every token T of the batch.

    L = alpha * sum_i f_i * P_i with f_i = E / (k T) * #tokens that picked i, P_i = mean_t p_t,i.

    With a process `group` the counts, token numbers and probability sums are first summed over
    its processes, so each computes the loss of the union of their batches. The probability sum
    goes through an all-reduce whose backward is again a sum: with every process holding the same
    loss and gradients averaged over processes, the gradient is exactly that of the global loss.
    """
    t, k = topk_idx.shape
    counts = expert_counts(topk_idx, num_experts).to(probs.dtype)
    if group is None:
        f = counts * (num_experts / (k * t))
        return alpha * (f * probs.mean(dim=0)).sum()
    import torch.distributed as dist

    counts_and_tokens = torch.cat([counts, counts.new_full((1,), float(t))])
    dist.all_reduce(counts_and_tokens, group=group)  # f_i is a count: no gradient flows through it
    counts, tokens = counts_and_tokens[:-1], counts_and_tokens[-1]
    prob_sum = _SumOverProcesses.apply(probs.sum(dim=0), group)
    f = counts * num_experts / (k * tokens)
    return alpha * (f * prob_sum / tokens).sum()


def _grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and not (a.dtype == b.dtype == torch.bfloat16):
        return False  # the compiler's shape function for _grouped_mm accepts bf16 only
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(a.device)
        # Row strides must be 16-byte aligned for the CUDA kernels.
        return major >= 9 and a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and a.shape[-1] % 8 == 0 and b.shape[-1] % 8 == 0
    return False


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of `a` (M, K), grouped contiguously by expert, times that expert's b[e] (K, N).

    counts (E,) and offs = cumsum(counts) stay on the device; only the fallback reads them on
    the host.
    """
    if _grouped_mm_supported(a, b):
        return torch._grouped_mm(a, b, offs=offs)
    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):  # one host sync, only on backends without grouped_mm
        if n:
            pieces.append(a[start:start + n] @ b[e])
        start += n
    return torch.cat(pieces) if pieces else a.new_zeros(0, b.shape[-1])


class StackedExperts(nn.Module):
    """E expert MLPs stored as stacked tensors in `x @ W` layout.

    swiglu: w_in (E, D, 2H) holds [gate | up], w_out (E, H, D); no biases (official DiT-MoE).
    gelu:   w_in (E, D, H) + b_in (E, H), w_out (E, H, D) + b_out (E, D) (original DiT MLP).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, kind: str):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.kind = num_experts, dim, hidden, kind
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

    def forward(self, xs: torch.Tensor, sorted_expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (M, D) sorted by expert; sorted_expert (M,) expert id of each row; -> (M, D)."""
        w_in, w_out = self.w_in, self.w_out
        if torch.is_autocast_enabled(xs.device.type):
            dt = torch.get_autocast_dtype(xs.device.type)
            xs, w_in, w_out = xs.to(dt), w_in.to(dt), w_out.to(dt)
        else:
            w_in, w_out = w_in.to(xs.dtype), w_out.to(xs.dtype)
        bucket = cpu_row_bucket(xs)
        if bucket:
            xs, sorted_expert, counts, rows = pad_groups(xs, sorted_expert, counts, self.num_experts, bucket)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = grouped_matmul(xs, w_in, counts, offs)  # (M, 2H) or (M, H)
        if self.kind == "swiglu":
            a = _SwiGLUFromFused.apply(h, self.hidden)
        else:
            a = F.gelu(h + self.b_in.to(h.dtype).index_select(0, sorted_expert), approximate="tanh")
        out = grouped_matmul(a, w_out, counts, offs)
        if self.b_out is not None:
            out = out + self.b_out.to(out.dtype).index_select(0, sorted_expert)
        return out.index_select(0, rows) if bucket else out


# oneDNN builds (JIT-compiles) a new bf16 / fp16 matmul kernel for every new row count it sees,
# which costs about as much as the product itself at these sizes; expert groups change size
# with every batch. Padding each group to a multiple of this many rows makes the shapes repeat,
# so the kernels come from oneDNN's cache. fp32 products take another GEMM path and stay unpadded.
CPU_ROW_BUCKET = 64


def cpu_row_bucket(xs: torch.Tensor) -> int:
    """Rows to pad each expert group to, or 0 where padding does not pay (GPUs, fp32, compile)."""
    if xs.device.type != "cpu" or xs.dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return 0
    return CPU_ROW_BUCKET


def pad_groups(xs: torch.Tensor, sorted_expert: torch.Tensor, counts: torch.Tensor, num_experts: int,
               bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero rows appended to each expert group up to a multiple of `bucket` rows (CPU only: the
    padded size is read on the host, which costs nothing there).

    Returns the padded rows, their expert ids, the padded counts, and `rows`: where each
    original row sits in the padded layout (`padded_out.index_select(0, rows)` undoes it).
    """
    padded = (counts + bucket - 1) // bucket * bucket
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    rows = torch.arange(xs.shape[0], device=xs.device) + (padded_start - start).index_select(0, sorted_expert)
    total = int(padded.sum())
    xp = xs.new_zeros(total, xs.shape[1]).index_copy(0, rows, xs)
    expert_ids = torch.repeat_interleave(torch.arange(num_experts, device=xs.device), padded)
    return xp, expert_ids, padded, rows


class _SwiGLUFromFused(torch.autograd.Function):
    """silu(h[:, :H]) * h[:, H:] for the fused [gate | up] projection.

    Autograd on the two strided halves saves three tensors and ends with a `cat`; this saves h
    only and writes the gradient of both halves straight into one contiguous (M, 2H) buffer.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, hidden: int) -> torch.Tensor:
        ctx.save_for_backward(h)
        ctx.hidden = hidden
        return F.silu(h[:, :hidden]) * h[:, hidden:]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        hid = ctx.hidden
        gate, up = h[:, :hid], h[:, hid:]
        # d silu(g) / dg = sig(g) * (1 + g * (1 - sig(g))); d / d up = silu(g).
        if torch.compiler.is_compiling():  # the compiler rejects strided out= and fuses the cat anyway
            sig = torch.sigmoid(gate)
            return torch.cat([grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig], dim=-1), None
        dh = torch.empty_like(h)
        # Four passes (silu, two products, silu's fused derivative) instead of eight elementwise
        # ops: on CPU, where bf16 elementwise work is not free, this was 1.7x faster.
        torch.mul(grad, F.silu(gate), out=dh[:, hid:])
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=dh[:, :hid])
        return dh, None


class _DispatchRows(torch.autograd.Function):
    """xs = x[order // k]: each token copied to its k expert slots, in expert order.

    The backward un-sorts with the inverse permutation and sums each token's k slots: a gather
    and a reduction, deterministic, where `index_select`'s backward would scatter-add atomically.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        return g.view(-1, ctx.k, g.shape[-1]).sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """y = x[perm] for a permutation; the backward is the gather by the inverse permutation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


RouteObserver = Callable[["MoE", torch.Tensor, torch.Tensor], None]


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward is again an all-reduce (sum) of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class MoE(nn.Module):
    """Routed experts plus an always-on shared expert: y = sum_k w_k E_k(x) + S(x)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int, shared_hidden: int,
                 kind: str = "swiglu", norm_topk: bool = False, aux_alpha: float = 0.01):
        super().__init__()
        self.num_experts, self.top_k, self.aux_alpha = num_experts, top_k, aux_alpha
        self.gate = Router(dim, num_experts, top_k, norm_topk)
        self.experts = StackedExperts(num_experts, dim, hidden, kind)
        # The official "2 shared experts" are one SwiGLU of width 2*D, added without a gate weight.
        self.shared_experts = SwiGLU(dim, shared_hidden) if shared_hidden > 0 else None
        # Set by analysis.RoutingRecorder for the duration of a `with` block; called with
        # (self, topk_idx (N, T, k), topk_weight (N, T, k)).
        self.observer: RouteObserver | None = None
        # Set by the trainer for a balance loss over all data-parallel processes' tokens
        # (`--balance-scope global`); None keeps it per process, as the official code has it.
        self.balance_group: Any = None

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """x (N, T, D) -> (N, T, D); with return_aux also the balance loss (scalar, fp32)."""
        n, t, d = x.shape
        flat = x.reshape(n * t, d)
        topk_idx, topk_w, probs = self.gate(flat)  # (NT, k), (NT, k), (NT, E)
        if self.observer is not None:
            self.observer(self, topk_idx.view(n, t, -1), topk_w.view(n, t, -1))

        k = self.top_k
        slot_expert = topk_idx.reshape(-1)  # (NT*k,) expert of each (token, slot)
        order = torch.argsort(slot_expert, stable=True)
        sorted_expert = slot_expert.index_select(0, order)
        counts = expert_counts(slot_expert, self.num_experts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        xs = _DispatchRows.apply(flat, order, inverse, k)  # (NT*k, D) grouped by expert
        ys = self.experts(xs, sorted_expert, counts)
        # Undo the sort with a gather (deterministic, unlike a scatter-add), then weight and sum
        # the k slots of each token.
        y = _Permute.apply(ys, inverse, order).view(n * t, k, d)
        y = (y * topk_w.unsqueeze(-1).to(y.dtype)).sum(dim=1).view(n, t, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if not return_aux:
            return y
        if self.aux_alpha > 0:
            aux = balance_loss(probs, topk_idx, self.num_experts, self.aux_alpha, group=self.balance_group)
        else:
            aux = probs.new_zeros(())
        return y, aux
