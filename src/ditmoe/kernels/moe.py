"""Faster equivalents of the MoE's dispatcher and experts (`ditmoe.models.moe`), same function.

`FastDispatcher` and `FastExperts` replace a layer's `Dispatcher` and `Experts` (`ditmoe.kernels.apply`):

- One plan groups, pads and un-groups the (token, expert) pairs of any assignment. The pairs
  sum back per token in slots: slot s holds each token's s-th pair, the slots one contiguous
  block after another, so the weighted sum is one product and a fused multiply-add per further
  slot. Top-k pairs are numbered slot-major already (k slots of T tokens); for a variable number
  of pairs per token (zero included) the plan orders the tokens by their number of pairs, so
  that slot s covers a prefix of them (`slot_order`). Tokens are cast to the compute dtype
  before the gather to their rows, not after (`_DispatchRows`), and both directions have
  deterministic backward passes written out (`_DispatchRows`, `_CombineSlots`): sums over slots
  and gathers, no scatter-add.
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


class SlotOrder(NamedTuple):
    """The pairs of a variable-pair assignment in the order in which they sum back per token.

    Slot s holds the s-th pair (in pair order) of every token that has more than s pairs. The
    tokens are taken in `token_order` (most pairs first, ties by token), so slot s covers the
    first sizes[s] of them, and the slots follow one another: slot position q = (start of s) +
    position of the token. Top-k pairs need none of this: slot-major, they already are in it.
    """

    sizes: tuple[int, ...]  # pairs (= tokens) in each slot, non-increasing
    token_order: torch.Tensor  # (T,) tokens by number of pairs, most first
    token_pos: torch.Tensor  # (T,) position of each token in token_order
    pair: torch.Tensor  # (P,) the assignment's pair at each slot position
    pair_pos: torch.Tensor  # (P,) slot position of each of the assignment's pairs


def slot_order(a: Assignment) -> SlotOrder:
    """Slot order (above) of the pairs of `a`; reads the slot sizes on the host.

    Stable sorts and integer counts only, and every indexed write below goes through a
    permutation (each index once): the same order on every run and device.
    """
    token, num_tokens, p = a.token, a.num_tokens, a.token.numel()
    per_token = a.pairs_per_token()
    token_order = torch.argsort(per_token, descending=True, stable=True)
    token_pos = torch.empty_like(token_order)
    token_pos[token_order] = torch.arange(num_tokens, device=token.device)
    # sizes[s] = tokens with more than s pairs, from the histogram of pairs per token.
    hist = torch.bincount(per_token, minlength=1)
    sizes = tuple((num_tokens - torch.cumsum(hist, 0)[:-1]).tolist())
    # Each pair's slot: its rank among its token's pairs, in pair order.
    by_token = torch.argsort(token, stable=True)
    first = torch.cumsum(per_token, 0) - per_token
    slot = torch.empty_like(by_token)
    slot[by_token] = torch.arange(p, device=token.device) - first.index_select(0, token.index_select(0, by_token))
    slot_start = torch.tensor((0,) + sizes[:-1], dtype=torch.long, device=token.device).cumsum(0)
    pair_pos = slot_start.index_select(0, slot) + token_pos.index_select(0, token)
    pair = torch.empty_like(pair_pos)
    pair[pair_pos] = torch.arange(p, device=token.device)
    return SlotOrder(sizes, token_order, token_pos, pair, pair_pos)


class FastPlan(NamedTuple):
    """Where each (token, expert) pair goes in the expert-grouped row layout, and how the rows
    sum back per token.

    The pairs are taken in slot order: for top-k assignments their own order, slot-major
    (j = slot * T + token, k slots of T); for any other `slots` says it (`SlotOrder`).
    """

    row_token: torch.Tensor  # (R,) token read by each expert row; padding rows read token 0
    pair_row: torch.Tensor  # (P,) expert row of each pair, in slot order
    row_pair: torch.Tensor | None  # (R,) slot position of each row when there is no padding (R = P), else None
    groups: Groups  # rows per expert, padding included; equal_rows > 0: every group that many rows
    sizes: tuple[int, ...]  # pairs in each slot: top-k, k times T
    slots: SlotOrder | None  # None: top-k, the pairs already in slot order


def plan_dispatch(a: Assignment, bucket: int = 0,
                  max_padding: float | None = EQUAL_GROUPS_MAX_PADDING) -> FastPlan:
    """Group the pairs of `a` by expert, stably (ties in pair order, as the reference dispatcher).

    With `bucket` > 0 every expert group is padded to a multiple of that many rows, and where
    `max_padding` allows (None: never), all groups to the size of the largest. Padding rows read
    an arbitrary real token and their outputs are never read back, so they receive a zero
    gradient and add exactly zero to the weight gradients. For top-k assignments without
    padding the plan stays on the device (no host synchronisation); with padding the group
    sizes are read on the host (CPU only), and for variable pairs the slot sizes too.
    """
    row_pair = torch.argsort(a.expert, stable=True)
    counts = expert_counts(a.expert, a.num_experts)
    pair_row = torch.empty_like(row_pair)
    pair_row[row_pair] = torch.arange(row_pair.numel(), device=row_pair.device)
    if not bucket:
        row_token, groups = a.token.index_select(0, row_pair), Groups(counts)
    else:
        padded = (counts + bucket - 1) // bucket * bucket
        most, total = torch.stack([padded.max(), padded.sum()]).tolist()
        group_rows = 0
        if max_padding is not None and most * a.num_experts <= (1 + max_padding) * total:
            padded, group_rows, total = torch.full_like(padded, most), most, most * a.num_experts
        shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
        pair_row = pair_row + shift.index_select(0, a.expert)
        row_token = torch.zeros(total, dtype=torch.long, device=a.token.device).index_copy_(0, pair_row, a.token)
        row_pair, groups = None, Groups(padded, group_rows)
    if a.k:
        return FastPlan(row_token, pair_row, row_pair, groups, (a.num_tokens,) * a.k, None)
    slots = slot_order(a)
    if row_pair is not None:
        row_pair = slots.pair_pos.index_select(0, row_pair)
    return FastPlan(row_token, pair_row.index_select(0, slots.pair), row_pair, groups, slots.sizes, slots)


def _sum_slots(pairs: torch.Tensor, sizes: tuple[int, ...], num_tokens: int, dtype: torch.dtype,
               w: torch.Tensor | None = None) -> torch.Tensor:
    """(T, D) in `dtype`: row i the sum over slots s with sizes[s] > i of pairs[start_s + i]
    (times w[start_s + i] if given); rows past sizes[0] (tokens without pairs) zero.

    Every slot is a contiguous block added to a prefix of the output, one slot after another:
    each row sums its pairs in slot order, deterministically, with no scatter.
    """
    out = pairs.new_empty(num_tokens, pairs.shape[-1], dtype=dtype)
    n0 = sizes[0] if sizes else 0
    if w is None:
        out[:n0].copy_(pairs[:n0])
    else:
        torch.mul(pairs[:n0], w[:n0, None], out=out[:n0])
    out[n0:].zero_()
    start = n0
    for n in sizes[1:]:
        if w is None:
            out[:n] += pairs[start:start + n]
        else:
            out[:n].addcmul_(pairs[start:start + n], w[start:start + n, None])
        start += n
    return out


class _DispatchRows(torch.autograd.Function):
    """xs = x.to(dtype)[row_token]: each token copied to its expert rows, in expert order.

    The cast happens before the gather (T rows converted, not P), inside the function, so the
    backward can sum each token's row gradients in fp32 before returning them in x's dtype.
    The backward is a gather and a sum over slots (`_sum_slots`), deterministic, where
    `index_select`'s own backward would scatter-add atomically.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, row_token: torch.Tensor, pair_row: torch.Tensor, sizes: tuple[int, ...],
                token_pos: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(pair_row, token_pos)
        ctx.sizes, ctx.num_tokens = sizes, x.shape[0]
        ctx.sum_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for float64 inputs
        return x.to(dtype).index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pair_row, token_pos = ctx.saved_tensors
        out = _sum_slots(grad.index_select(0, pair_row), ctx.sizes, ctx.num_tokens, ctx.sum_dtype)
        if token_pos is not None:  # slot order's tokens back in token order
            out = out.index_select(0, token_pos)
        return out, None, None, None, None, None


class _CombineSlots(torch.autograd.Function):
    """y[t] = sum over t's pairs j of w[j] * ys[row of j]: the expert rows back in token order,
    weighted by their router weights and summed per token; padding rows dropped.

    In slot order (`FastPlan`) each slot is one contiguous block, so the sum is one product and
    a fused multiply-add per further slot (`_sum_slots`). Each row is read at most once, so the
    backward writes each row's gradient once (a gather by the inverse permutation, or with
    padding a copy into zeros), and the weight gradients come back to pair order by a gather:
    deterministic. Written out because autograd's backward of the per-slot views builds a
    zero-filled gradient per slot and then adds them up.
    """

    @staticmethod
    def forward(ctx, ys: torch.Tensor, w: torch.Tensor, pair_row: torch.Tensor, row_pair: torch.Tensor | None,
                sizes: tuple[int, ...], slots: SlotOrder | None) -> torch.Tensor:
        y_pairs = ys.index_select(0, pair_row)  # (P, D), slot order
        w_c = (w if slots is None else w.index_select(0, slots.pair)).to(ys.dtype)
        t = sizes[0] if slots is None else slots.token_pos.numel()
        y = _sum_slots(y_pairs, sizes, t, ys.dtype, w_c)
        if slots is not None:  # slot order's tokens back in token order
            y = y.index_select(0, slots.token_pos)
        ctx.save_for_backward(y_pairs, w_c, pair_row, row_pair)
        ctx.sizes, ctx.slots, ctx.rows, ctx.w_dtype = sizes, slots, ys.shape[0], w.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y_pairs, w_c, pair_row, row_pair = ctx.saved_tensors
        sizes, slots = ctx.sizes, ctx.slots
        grad = grad.to(y_pairs.dtype)
        if slots is not None:  # tokens in slot order: each slot reads a prefix
            grad = grad.index_select(0, slots.token_order)
        d_ys = d_w = None
        if ctx.needs_input_grad[0]:
            d_pairs, start = torch.empty_like(y_pairs), 0
            for n in sizes:
                torch.mul(grad[:n], w_c[start:start + n, None], out=d_pairs[start:start + n])
                start += n
            if row_pair is not None:
                d_ys = d_pairs.index_select(0, row_pair)
            else:
                d_ys = d_pairs.new_zeros(ctx.rows, d_pairs.shape[-1]).index_copy_(0, pair_row, d_pairs)
        if ctx.needs_input_grad[1]:
            d_w, start = torch.empty_like(w_c), 0
            for n in sizes:
                torch.sum(y_pairs[start:start + n] * grad[:n], -1, out=d_w[start:start + n])
                start += n
            if slots is not None:  # back to pair order
                d_w = d_w.index_select(0, slots.pair_pos)
            d_w = d_w.to(ctx.w_dtype)
        return d_ys, d_w, None, None, None, None


class FastDispatcher(Dispatcher):
    """The plan above for every assignment, top-k or variable-pair.

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
        dt = compute_dtype(x)
        if self.exact:
            bucket = 0
        else:
            bucket = cpu_row_bucket(dt, x.device) if self.row_bucket is None else self.row_bucket
        plan = plan_dispatch(a, bucket, self.max_padding)
        token_pos = None if plan.slots is None else plan.slots.token_pos
        return _DispatchRows.apply(x, plan.row_token, plan.pair_row, plan.sizes, token_pos, dt), plan

    def combine(self, rows: torch.Tensor, plan: FastPlan, a: Assignment) -> torch.Tensor:
        return _CombineSlots.apply(rows, a.weight, plan.pair_row, plan.row_pair, plan.sizes, plan.slots)


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


__all__ = ["CPU_ROW_BUCKET", "EQUAL_GROUPS_MAX_PADDING", "FastDispatcher", "FastExperts", "FastPlan", "SlotOrder",
           "cpu_row_bucket", "grouped_matmul", "plan_dispatch", "slot_order"]
