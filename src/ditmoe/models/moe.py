"""Sparse Mixture-of-Experts layer: softmax top-k router, stacked experts, shared expert.

Dispatch is dropless and identical in training and inference: the (token, slot) pairs are sorted
by expert, every expert reads one contiguous slice, and the results are put back in token order.
Where the backend has a grouped matrix product (`torch._grouped_mm`: CPU in fp32 / bf16 / fp16,
CUDA bf16 on sm90+) the whole layer is two grouped GEMMs with no host synchronisation; elsewhere a loop
over the contiguous slices does the same arithmetic. On CPU in bf16 / fp16, where the groups are
padded anyway, nearly equal groups are padded to one size and run as batched products (`torch.bmm`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_kernels import compute_dtype
from .fused_swiglu import swiglu
from .layers import SwiGLU
from .weight_casts import cast_weight


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
    if a.device.type == "cpu":  # no float64 kernel: float64 models take the loop
        return a.dtype in (torch.float32, torch.bfloat16, torch.float16) and b.dtype == a.dtype
    if a.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(a.device)
        # Row strides must be 16-byte aligned for the CUDA kernels.
        return major >= 9 and a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and a.shape[-1] % 8 == 0 and b.shape[-1] % 8 == 0
    return False


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor,
                   group_rows: int = 0, copy_a_t: bool = False) -> torch.Tensor:
    """Rows of `a` (M, K), grouped contiguously by expert, times that expert's b[e] (K, N).

    counts (E,) and offs = cumsum(counts) stay on the device; only the fallback reads them on
    the host. With `group_rows` > 0 every group holds exactly that many rows (M = E * group_rows)
    and the product is one batched product; `copy_a_t` then has its weight gradient read a
    contiguous copy of a's transpose (see `_EqualGroupsMatmul`).
    """
    if group_rows:
        return _EqualGroupsMatmul.apply(a, b, group_rows, copy_a_t)
    if _grouped_mm_supported(a, b):
        return torch._grouped_mm(a, b, offs=offs)
    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):  # one host sync, only on backends without grouped_mm
        if n:
            pieces.append(a[start:start + n] @ b[e])
        start += n
    return torch.cat(pieces) if pieces else a.new_zeros(0, b.shape[-1])


class _EqualGroupsMatmul(torch.autograd.Function):
    """a (E * R, K) viewed as (E, R, K), times b (E, K, N): one `torch.bmm`, returned as (E * R, N).

    On CPU oneDNN runs a batched product of E equal groups faster than E separate products
    over the same rows (`benchmarks/expert_products.py`: the six expert products of
    DiT-MoE-S/2 1.06 to 1.47x, of B/2 1.21x). The backward is written out to choose the operand
    layout of the weight gradient a^T @ grad: for the first projection (K = D, N = 2H) reading
    a contiguous copy of a^T was 1.15 to 1.6x faster than reading the transposed view, copy
    included; for the second (K = H, N = D) the view is faster.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, group_rows: int, copy_a_t: bool) -> torch.Tensor:
        a3 = a.view(b.shape[0], group_rows, a.shape[-1])
        ctx.save_for_backward(a3, b)
        ctx.copy_a_t = copy_a_t
        return torch.bmm(a3, b).view(-1, b.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a3, b = ctx.saved_tensors
        g3 = grad.view(b.shape[0], -1, b.shape[-1])
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = torch.bmm(g3, b.transpose(1, 2)).view(-1, a3.shape[-1])
        if ctx.needs_input_grad[1]:
            at = a3.transpose(1, 2)
            gb = torch.bmm(at.contiguous() if ctx.copy_a_t else at, g3)
        return ga, gb, None, None


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

    def row_bucket(self, dtype: torch.dtype, device: torch.device) -> int:
        """Rows the caller should pad each expert group to a multiple of (0: no padding)."""
        return cpu_row_bucket(dtype, device)

    def forward(self, xs: torch.Tensor, sorted_expert: torch.Tensor, counts: torch.Tensor,
                group_rows: int = 0) -> torch.Tensor:
        """xs (M, D) grouped by expert; sorted_expert (M,) expert id of each row; counts (E,)
        rows per expert -> (M, D). `group_rows` > 0: every group has that many rows."""
        dt = compute_dtype(xs)
        xs, w_in, w_out = xs.to(dt), cast_weight(self.w_in, dt), cast_weight(self.w_out, dt)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = grouped_matmul(xs, w_in, counts, offs, group_rows, copy_a_t=True)  # (M, 2H) or (M, H)
        if self.kind == "swiglu":
            a = swiglu(h, self.hidden)
        else:
            a = F.gelu(h + self.b_in.to(h.dtype).index_select(0, sorted_expert), approximate="tanh")
        out = grouped_matmul(a, w_out, counts, offs, group_rows)
        if self.b_out is not None:
            out = out + self.b_out.to(out.dtype).index_select(0, sorted_expert)
        return out


# oneDNN builds (JIT-compiles) a new bf16 / fp16 matmul kernel for every new row count it sees,
# which costs about as much as the product itself at these sizes; expert groups change size
# with every batch. Padding each group to a multiple of this many rows makes the shapes repeat,
# so the kernels come from oneDNN's cache. fp32 products take another GEMM path and stay unpadded.
CPU_ROW_BUCKET = 64
# When the padded groups are nearly equal, every group is padded to the largest and the experts
# run as batched products (`_EqualGroupsMatmul`), as long as that adds at most this fraction of
# rows: padding rows cost their FLOPs, and the batched products gain 1.1 to 1.5x. None: never.
EQUAL_GROUPS_MAX_PADDING: float | None = 0.2


def cpu_row_bucket(dtype: torch.dtype, device: torch.device) -> int:
    """Rows to pad each expert group to, or 0 where padding does not pay (GPUs, fp32, compile)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return 0
    return CPU_ROW_BUCKET


class DispatchPlan(NamedTuple):
    """Where each (slot, token) pair of a top-k routing goes in the expert-grouped row layout.

    Pairs are numbered slot-major, j = slot * T + token, so that the k outputs of one slot form
    one contiguous (T, D) block and the weighted sum over slots is k - 1 fused multiply-adds
    (a reduction over a middle axis of size k is several times slower on CPU).
    """

    row_token: torch.Tensor  # (P,) token read by each expert row; padding rows read token 0
    pair_row: torch.Tensor  # (k*T,) expert row of each (slot, token) pair
    row_pair: torch.Tensor | None  # (P,) pair of each row when there is no padding (P = k*T), else None
    row_expert: torch.Tensor  # (P,) expert of each row
    counts: torch.Tensor  # (E,) rows per expert, padding included
    group_rows: int = 0  # > 0: every expert group padded to exactly this many rows


def plan_dispatch(topk_idx: torch.Tensor, num_experts: int, bucket: int = 0) -> DispatchPlan:
    """Group the (slot, token) pairs of `topk_idx` (T, k) by expert, stably (ties in pair order).

    With `bucket` > 0 every expert group is padded to a multiple of that many rows, and where
    `EQUAL_GROUPS_MAX_PADDING` allows, all groups to the size of the largest. Padding rows read an
    arbitrary real token and their outputs are never read back, so they receive a zero gradient
    and add exactly zero to the weight gradients. Without padding the plan stays on the device
    (no host synchronisation); with it the group sizes are read on the host (CPU only).
    """
    t, k = topk_idx.shape
    pair_expert = topk_idx.t().reshape(-1)  # (k*T,) slot-major
    row_pair = torch.argsort(pair_expert, stable=True)
    counts = expert_counts(pair_expert, num_experts)
    pair_row = torch.empty_like(row_pair)
    pair_row[row_pair] = torch.arange(row_pair.numel(), device=row_pair.device)
    if not bucket:
        return DispatchPlan(row_pair % t, pair_row, row_pair, pair_expert.index_select(0, row_pair), counts)
    padded = (counts + bucket - 1) // bucket * bucket
    most, total = torch.stack([padded.max(), padded.sum()]).tolist()
    group_rows = 0
    if EQUAL_GROUPS_MAX_PADDING is not None and most * num_experts <= (1 + EQUAL_GROUPS_MAX_PADDING) * total:
        padded, group_rows, total = torch.full_like(padded, most), most, most * num_experts
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
    pair_row = pair_row + shift.index_select(0, pair_expert)
    pair_token = torch.arange(k * t, device=topk_idx.device) % t
    row_token = torch.zeros(total, dtype=torch.long, device=topk_idx.device).index_copy_(0, pair_row, pair_token)
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=topk_idx.device), padded, output_size=total)
    return DispatchPlan(row_token, pair_row, None, row_expert, padded, group_rows)


class _DispatchRows(torch.autograd.Function):
    """xs = x.to(dtype)[row_token]: each token copied to its k expert rows, in expert order.

    The cast happens before the gather (T rows converted, not k*T), inside the function, so the
    backward can sum each token's k row gradients in fp32 before returning them in x's dtype.
    The backward is a gather and a sum, deterministic, where `index_select`'s own backward would
    scatter-add atomically.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, row_token: torch.Tensor, pair_row: torch.Tensor, k: int,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(pair_row)
        ctx.k = k
        ctx.sum_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for float64 inputs
        return x.to(dtype).index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pair_row,) = ctx.saved_tensors
        g = grad.index_select(0, pair_row).view(ctx.k, -1, grad.shape[-1])  # (k, T, D)
        out = g[0].to(ctx.sum_dtype, copy=True)
        for slot in range(1, ctx.k):
            out += g[slot]
        return out, None, None, None, None


class _CombineSlots(torch.autograd.Function):
    """y[t] = sum over slots s of w[t, s] * ys[pair_row[s * T + t]]: the expert rows back in token
    order, weighted by their router weights and summed over the k slots; padding rows dropped.

    Slot-major pairs make each slot one contiguous (T, D) block, so the sum is one product and
    k - 1 fused multiply-adds. Each row is read at most once, so the backward writes each row's
    gradient once (a gather by the inverse permutation, or with padding a copy into zeros):
    deterministic. Written out because autograd's backward of the per-slot views builds a
    zero-filled (k, T, D) gradient per slot and then adds them up.
    """

    @staticmethod
    def forward(ctx, ys: torch.Tensor, w: torch.Tensor, pair_row: torch.Tensor,
                row_pair: torch.Tensor | None) -> torch.Tensor:
        k = w.shape[1]
        y_pairs = ys.index_select(0, pair_row).view(k, -1, ys.shape[-1])  # (k, T, D)
        w_c = w.to(ys.dtype)
        y = y_pairs[0] * w_c[:, :1]
        for slot in range(1, k):
            y.addcmul_(y_pairs[slot], w_c[:, slot:slot + 1])
        ctx.save_for_backward(y_pairs, w_c, pair_row, row_pair)
        ctx.rows, ctx.w_dtype = ys.shape[0], w.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y_pairs, w_c, pair_row, row_pair = ctx.saved_tensors
        grad = grad.to(y_pairs.dtype)
        d_ys = d_w = None
        if ctx.needs_input_grad[0]:
            d_pairs = torch.empty_like(y_pairs)
            for slot in range(w_c.shape[1]):
                torch.mul(grad, w_c[:, slot:slot + 1], out=d_pairs[slot])
            d_pairs = d_pairs.view(-1, y_pairs.shape[-1])
            if row_pair is not None:
                d_ys = d_pairs.index_select(0, row_pair)
            else:
                d_ys = d_pairs.new_zeros(ctx.rows, d_pairs.shape[-1]).index_copy_(0, pair_row, d_pairs)
        if ctx.needs_input_grad[1]:
            d_w = torch.stack([(y_pairs[slot] * grad).sum(-1) for slot in range(w_c.shape[1])], 1).to(ctx.w_dtype)
        return d_ys, d_w, None, None


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
        dt = compute_dtype(x)
        plan = plan_dispatch(topk_idx, self.num_experts, self.experts.row_bucket(dt, x.device))
        xs = _DispatchRows.apply(flat, plan.row_token, plan.pair_row, k, dt)  # (P, D) grouped by expert
        ys = self.experts(xs, plan.row_expert, plan.counts, plan.group_rows)
        y = _CombineSlots.apply(ys, topk_w, plan.pair_row, plan.row_pair).view(n, t, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if not return_aux:
            return y
        if self.aux_alpha > 0:
            aux = balance_loss(probs, topk_idx, self.num_experts, self.aux_alpha, group=self.balance_group)
        else:
            aux = probs.new_zeros(())
        return y, aux
