"""Faster equivalents of the MoE's dispatcher and experts (`ditmoe.models.moe`), same function.

`FastDispatcher` and `FastExperts` replace a layer's `Dispatcher` and `Experts` (`ditmoe.kernels.apply`):

- One plan groups, pads and un-groups the (slot, token) pairs of a top-k assignment, numbered
  slot-major so that the weighted sum over the k slots is one product and k - 1 fused
  multiply-adds on contiguous blocks. Tokens are cast to the compute dtype before the k-fold
  gather, not after (`_DispatchRows`), and both directions have deterministic backward passes
  written out (`_DispatchRows`, `_CombineSlots`).
- On CPU in bf16 / fp16 each expert group is padded to a multiple of `CPU_ROW_BUCKET` rows:
  oneDNN JIT-compiles a new half-precision matmul kernel for every row count it has not seen,
  which costs about as much as the product itself at these sizes, and expert groups change size
  with every batch; padded, the shapes repeat and the kernels come from oneDNN's cache. fp32
  products take another GEMM path and stay unpadded, as do GPUs and compiled graphs.
- Where padding every group to the largest adds at most `max_padding` of the rows, the groups are
  made equal and the experts run as batched products (`_EqualGroupsMatmul`), which oneDNN runs
  faster than one product per group.
- Each expert weight is cast through `weight_casts.cast_weight` (once per sampling run) and the
  SwiGLU runs through the one-pass CPU kernels (`fused_swiglu`).

Assignments that are not top-k (a variable number of experts per token) take the reference
dispatcher's path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..models.layers import compute_dtype
from ..models.moe import Assignment, Dispatcher, Experts, Groups, expert_counts, grouped_mm_supported
from .fused_swiglu import swiglu
from .weight_casts import cast_weight

# Rows each expert group is padded to a multiple of on CPU in bf16 / fp16 (see the module text).
CPU_ROW_BUCKET = 64
# Largest fraction of extra rows accepted to make all groups equal (batched products 1.1 to 1.5x
# faster; padding rows cost their FLOPs).
EQUAL_GROUPS_MAX_PADDING = 0.2


def cpu_row_bucket(dtype: torch.dtype, device: torch.device) -> int:
    """Rows to pad each expert group to, or 0 where padding does not pay (GPUs, fp32, compile)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return 0
    return CPU_ROW_BUCKET


class FastPlan(NamedTuple):
    """Where each (slot, token) pair of a top-k routing goes in the expert-grouped row layout.

    Pairs are numbered slot-major, j = slot * T + token (as `Assignment.top_k` numbers them).
    """

    row_token: torch.Tensor  # (P,) token read by each expert row; padding rows read token 0
    pair_row: torch.Tensor  # (k*T,) expert row of each (slot, token) pair
    row_pair: torch.Tensor | None  # (P,) pair of each row when there is no padding (P = k*T), else None
    groups: Groups  # rows per expert, padding included; equal_rows > 0: every group that many rows


def plan_dispatch(pair_expert: torch.Tensor, k: int, num_experts: int, bucket: int = 0,
                  max_padding: float | None = EQUAL_GROUPS_MAX_PADDING) -> FastPlan:
    """Group the slot-major pairs' experts `pair_expert` (k*T,) by expert, stably (ties in pair order).

    With `bucket` > 0 every expert group is padded to a multiple of that many rows, and where
    `max_padding` allows (None: never), all groups to the size of the largest. Padding rows read
    an arbitrary real token and their outputs are never read back, so they receive a zero
    gradient and add exactly zero to the weight gradients. Without padding the plan stays on the
    device (no host synchronisation); with it the group sizes are read on the host (CPU only).
    """
    t = pair_expert.numel() // k
    row_pair = torch.argsort(pair_expert, stable=True)
    counts = expert_counts(pair_expert, num_experts)
    pair_row = torch.empty_like(row_pair)
    pair_row[row_pair] = torch.arange(row_pair.numel(), device=row_pair.device)
    if not bucket:
        return FastPlan(row_pair % t, pair_row, row_pair, Groups(counts))
    padded = (counts + bucket - 1) // bucket * bucket
    most, total = torch.stack([padded.max(), padded.sum()]).tolist()
    group_rows = 0
    if max_padding is not None and most * num_experts <= (1 + max_padding) * total:
        padded, group_rows, total = torch.full_like(padded, most), most, most * num_experts
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
    pair_row = pair_row + shift.index_select(0, pair_expert)
    pair_token = torch.arange(k * t, device=pair_expert.device) % t
    row_token = torch.zeros(total, dtype=torch.long, device=pair_expert.device).index_copy_(0, pair_row, pair_token)
    return FastPlan(row_token, pair_row, None, Groups(padded, group_rows))


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


class FastDispatcher(Dispatcher):
    """The plan above for top-k assignments; the reference dispatch for any other.

    `row_bucket`: None pads on CPU in bf16 / fp16 (`cpu_row_bucket`), 0 never pads, n > 0
    always pads to multiples of n. `max_padding`: see `plan_dispatch`. `exact`: never pads,
    whatever `row_bucket` says (expert parallelism: padding rows would travel through both
    exchanges; `ditmoe.kernels.apply` leaves it as it is).
    """

    def __init__(self, row_bucket: int | None = None, max_padding: float | None = EQUAL_GROUPS_MAX_PADDING,
                 exact: bool = False):
        super().__init__()
        self.row_bucket, self.max_padding, self.exact = row_bucket, max_padding, exact

    def extra_repr(self) -> str:
        return f"row_bucket={self.row_bucket}, max_padding={self.max_padding}, exact={self.exact}"

    def dispatch(self, x: torch.Tensor, a: Assignment):
        if not a.k:
            return super().dispatch(x, a)
        dt = compute_dtype(x)
        if self.exact:
            bucket = 0
        else:
            bucket = cpu_row_bucket(dt, x.device) if self.row_bucket is None else self.row_bucket
        plan = plan_dispatch(a.expert, a.k, a.num_experts, bucket, self.max_padding)
        return _DispatchRows.apply(x, plan.row_token, plan.pair_row, a.k, dt), plan

    def combine(self, rows: torch.Tensor, plan, a: Assignment) -> torch.Tensor:
        if not isinstance(plan, FastPlan):
            return super().combine(rows, plan, a)
        return _CombineSlots.apply(rows, a.weights, plan.pair_row, plan.row_pair)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, equal_rows: int = 0,
                   copy_a_t: bool = False, use_grouped_mm: bool = True) -> torch.Tensor:
    """Rows of `a` (M, K), grouped contiguously by expert, times that expert's b[e] (K, N).

    With `equal_rows` > 0 every group holds exactly that many rows (M = E * equal_rows) and the
    product is one batched product; `copy_a_t` then has its weight gradient read a contiguous
    copy of a's transpose (see `_EqualGroupsMatmul`). Else `torch._grouped_mm` where it has a
    kernel (inside torch.compile: bf16 only, the compiler's shape function accepts no other
    dtype), else a loop over the groups.
    """
    if equal_rows:
        return _EqualGroupsMatmul.apply(a, b, equal_rows, copy_a_t)
    if use_grouped_mm and grouped_mm_supported(a, b) and (
            not torch.compiler.is_compiling() or a.dtype == torch.bfloat16):
        return torch._grouped_mm(a, b, offs=torch.cumsum(counts, 0).to(torch.int32))
    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):  # one host sync, only on backends without grouped_mm
        if n:
            pieces.append(a[start:start + n] @ b[e])
        start += n
    return torch.cat(pieces) if pieces else a.new_zeros(0, b.shape[-1])


class _EqualGroupsMatmul(torch.autograd.Function):
    """a (E * R, K) viewed as (E, R, K), times b (E, K, N): one `torch.bmm`, returned as (E * R, N).

    The backward is written out to choose the operand layout of the weight gradient a^T @ grad:
    for the first projection (K = D, N = 2H) reading a contiguous copy of a^T is faster than
    reading the transposed view, copy included; for the second (K = H, N = D) the view is.
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


class FastExperts(Experts):
    """`Experts` with cached weight casts, equal-group batched products and the fused SwiGLU
    (`fused`: the compiled one-pass CPU kernels where they apply). Same parameters."""

    fused: bool = True

    def forward(self, xs: torch.Tensor, groups: Groups) -> torch.Tensor:
        dt = compute_dtype(xs)
        xs, w_in, w_out = xs.to(dt), cast_weight(self.w_in, dt), cast_weight(self.w_out, dt)
        eq = groups.equal_rows
        h = grouped_matmul(xs, w_in, groups.counts, eq, copy_a_t=True, use_grouped_mm=self.grouped_mm)
        if self.kind == "swiglu":
            a = swiglu(h, self.hidden, fused=self.fused)
        else:
            row_expert = self.row_experts(groups, xs.shape[0])
            a = F.gelu(h + self.b_in.to(h.dtype).index_select(0, row_expert), approximate="tanh")
        out = grouped_matmul(a, w_out, groups.counts, eq, use_grouped_mm=self.grouped_mm)
        if self.b_out is not None:
            out = out + self.b_out.to(out.dtype).index_select(0, row_expert)
        return out


__all__ = ["CPU_ROW_BUCKET", "EQUAL_GROUPS_MAX_PADDING", "FastDispatcher", "FastExperts", "FastPlan",
           "cpu_row_bucket", "grouped_matmul", "plan_dispatch"]
