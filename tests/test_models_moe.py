"""The MoE layer against a slow, obviously-correct per-token reference."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from ditmoe import kernels
from ditmoe.kernels import cpu_kernels, fused_swiglu
from ditmoe.kernels.moe import CPU_ROW_BUCKET, plan_dispatch
from ditmoe.models.moe import Assignment, Dispatcher, Experts, MoE, Router, balance_loss, build_router, expert_counts
from ditmoe.models.routers import router_logits
from tolerances import (BF16_EPS, EPS32, assert_close_fp32, bf16_order_tol, fp64_tol, rel_err, roundings_tol,
                        underflow_tol)

# make_layer's MoE in fp32 against the float64 reference: the longest reduction is the shared
# expert's 32 (dim 16, expert width 24); the forward chains three (expert in, expert out, the
# weighted sum of slots and shared expert), a backward twice that (tolerances.py).
MOE_K, MOE_CHAIN = 32, 3


def reference_moe(layer: MoE, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token by token: sum_k w_k * expert_k(x) + shared(x), in float64."""
    ex = layer.experts
    flat = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(idx.shape[1]):
            e = idx[t, slot].item()
            h = flat[t] @ ex.w_in[e].double()
            if ex.kind == "swiglu":
                g, u = h.split(ex.hidden)
                a = F.silu(g) * u
                y = a @ ex.w_out[e].double()
            else:
                a = F.gelu(h + ex.b_in[e].double(), approximate="tanh")
                y = a @ ex.w_out[e].double() + ex.b_out[e].double()
            out[t] += w[t, slot].double() * y
    if layer.shared_experts is not None:
        s = layer.shared_experts
        out += F.linear(F.silu(F.linear(flat, s.gate_proj.weight.double())) * F.linear(flat, s.up_proj.weight.double()),
                        s.down_proj.weight.double())
    return out.view(x.shape)


class ForcedGate(Router):
    """A router that returns a planted choice `idx` (T, k) with random weights."""

    def __init__(self, idx: torch.Tensor, num_experts: int):
        super().__init__(num_experts)
        self.idx = idx
        self.w = torch.rand(idx.shape, generator=torch.Generator().manual_seed(1)) + 0.1

    def forward(self, x, cond=None):
        probs = torch.full((x.shape[0], self.num_experts), 1.0 / self.num_experts)
        return Assignment.top_k(self.idx, self.w, probs)

    def balance_loss(self, a):
        return balance_loss(a.probs, a.expert, self.num_experts, 0.01)


def choose_path(layer: MoE, path: str, use_grouped_mm: bool = True) -> MoE:
    """The reference layer as built, or with the speed layers of `ditmoe.kernels`."""
    if path == "fast":
        kernels.apply(layer, grouped_mm=use_grouped_mm)
    else:
        layer.experts.grouped_mm = use_grouped_mm
    return layer


def make_layer(kind="swiglu", shared=32, experts=4, k=2, dim=16, hidden=24):
    torch.manual_seed(0)
    layer = MoE(dim, experts, k, hidden, shared, kind=kind)
    if kind == "gelu":
        with torch.no_grad():
            layer.experts.b_in.normal_()
            layer.experts.b_out.normal_()
    return layer


def planted_routing(pattern: str, t: int) -> torch.Tensor:
    """Top-2 choices (t, 2) among 4 experts: random, one expert in every token, or two idle experts."""
    torch.manual_seed(5)
    if pattern == "random":
        return torch.stack([torch.randperm(4)[:2] for _ in range(t)])
    if pattern == "one_expert_gets_all":  # expert 3 in slot 0 of every token, expert 1 never used
        return torch.stack([torch.tensor([3, 0 if i % 2 else 2]) for i in range(t)])
    # experts 0 and 2 get nothing
    return torch.stack([torch.tensor([1, 3]) if i % 2 else torch.tensor([3, 1]) for i in range(t)])


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("pattern", ["random", "one_expert_gets_all", "some_experts_empty"])
@pytest.mark.parametrize("use_grouped_mm", [True, False])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_dispatch_matches_reference(kind, pattern, use_grouped_mm, path):
    layer = choose_path(make_layer(kind), path, use_grouped_mm)
    x = torch.randn(3, 10, 16)
    idx = planted_routing(pattern, 30)
    layer.gate = ForcedGate(idx, 4)
    w = layer.gate.w
    y = layer(x)
    ref = reference_moe(layer, x, idx, w)
    assert_close_fp32(y, ref, MOE_K, MOE_CHAIN)


@pytest.mark.parametrize("use_grouped_mm", [True, False])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_gradients_match_reference(use_grouped_mm, path):
    layer = choose_path(make_layer("swiglu"), path, use_grouped_mm)
    x = torch.randn(2, 8, 16, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    got_x = x.grad.clone()
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    a = layer.gate(x2.reshape(-1, 16))
    ref = reference_moe(layer, x2, a.expert_ids, a.weights)
    ref.backward(g.double())
    # The reference's gradients are float64 sums rounded once to the fp32 parameters' dtype.
    for n, p in layer.named_parameters():
        assert_close_fp32(got[n], p.grad, MOE_K, 2 * MOE_CHAIN, n)
    assert_close_fp32(got_x, x2.grad, MOE_K, 2 * MOE_CHAIN, "x")


@pytest.mark.parametrize("pattern", ["random", "one_expert_gets_all", "some_experts_empty"])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_float64_gradients_pass_gradcheck(pattern, path):
    """Dispatch, expert products and the (slot-major) weighted sum against finite differences in
    float64 (routing fixed: the router itself computes in fp32 by design)."""
    layer = choose_path(make_layer("swiglu").double(), path)
    layer.gate = ForcedGate(planted_routing(pattern, 12), 4)
    layer.gate.w = layer.gate.w.double()
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("pattern", ["random", "one_expert_gets_all", "some_experts_empty"])
@pytest.mark.parametrize("layout", ["exact", "padded", "equal-groups"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-swiglu", "eager-swiglu"])
def test_bf16_outputs_and_gradients_match_reference(kind, pattern, layout, fused):
    """bf16 on CPU pads each expert group to a multiple of 64 rows (cached oneDNN kernels), or
    all groups to one size for batched products, and runs SwiGLU through compiled one-pass
    kernels; with and without each, outputs and every gradient equal the float64 per-token
    reference within bf16 rounding, also with idle experts and with one expert in every token."""
    if kind == "gelu" and not fused:
        pytest.skip("GELU experts have no fused path")
    layer = make_layer(kind)
    # Equal groups however uneven the routing (idle experts then get whole groups of padding);
    # or never.
    kernels.apply(layer, fused=fused, row_bucket=0 if layout == "exact" else None,
                  max_padding=1e9 if layout == "equal-groups" else None)
    idx = planted_routing(pattern, 30)
    layer.gate = ForcedGate(idx, 4)
    x = torch.randn(3, 10, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        _, plan = layer.dispatcher.dispatch(x.detach().reshape(30, 16), layer.gate(x.reshape(30, 16)))
    assert y.dtype == torch.bfloat16
    rows = plan.groups.counts
    if layout == "exact":
        assert torch.equal(rows, torch.bincount(idx.reshape(-1), minlength=4))
    else:  # every group a multiple of the CPU bucket, holding at least its pairs
        assert (rows % CPU_ROW_BUCKET == 0).all() and (rows >= torch.bincount(idx.reshape(-1), minlength=4)).all()
    assert (plan.groups.equal_rows > 0) == (layout == "equal-groups")
    g = torch.randn(y.shape)
    y.float().backward(g)
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    ref = reference_moe(layer, x2, idx, layer.gate.w)
    ref.backward(g.double())

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()

    # bf16 keeps 8 mantissa bits: about 2^-8 relative per rounding, a few roundings deep.
    assert rel(y, ref) < 2e-2
    assert rel(x.grad, x2.grad) < 2e-2
    for n, p in layer.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert rel(got[n], p.grad) < 2e-2, n
        elif n in got:
            assert got[n].abs().sum() == 0, n
    if pattern == "some_experts_empty":  # padding rows must not leak gradient into idle experts
        assert got["experts.w_in"][[0, 2]].abs().sum() == 0 and got["experts.w_out"][[0, 2]].abs().sum() == 0


@pytest.mark.parametrize("pairs", ["top-k", "variable"])
@pytest.mark.parametrize("loads, equal", [([130, 130, 130, 130, 130, 120], True),  # buckets 5 x 192, 128: +6%
                                          ([190, 60, 125, 125], False),  # padded 192, 64, 128, 128: +50%
                                          ([0, 250, 0, 250], False)])  # two idle experts: +100%
def test_plan_pads_to_equal_groups_only_when_that_adds_few_rows(loads, equal, pairs):
    """Equal groups cost padding rows: taken up to max_padding (default 20%) more rows than
    the 64-row buckets need, not beyond. Either way every pair has one row of its expert, and
    the other rows are padding. Top-k: (slot, token) pairs, slot-major. Variable: the same
    experts on tokens with 0 to 6 pairs, in shuffled pair order; the plan's slots take each
    token's pairs in pair order, the tokens with the most pairs first."""
    e, k = len(loads), 2
    g = torch.Generator().manual_seed(0)
    pair_expert = torch.repeat_interleave(torch.arange(e), torch.tensor(loads))
    pair_expert = pair_expert[torch.randperm(pair_expert.numel(), generator=g)]
    p = pair_expert.numel()
    if pairs == "top-k":
        t = p // k
        idx = pair_expert.view(k, t).t()  # slot-major pairs: pair j = slot * T + token
        a = Assignment.top_k(idx, torch.ones(t, k), torch.zeros(t, e))
    else:
        per = torch.randint(0, 7, (p,), generator=g)  # pairs per token, zero included
        per = per[:int((torch.cumsum(per, 0) < p).sum()) + 1]
        per[-1] -= per.sum() - p
        t = per.numel() + 3  # three tokens at the end without pairs
        token = torch.repeat_interleave(torch.arange(per.numel()), per)[torch.randperm(p, generator=g)]
        a = Assignment(token, pair_expert, torch.ones(p), torch.zeros(t, e))
        assert (a.pairs_per_token() == 0).any() and a.pairs_per_token().max() >= 5
    plan = plan_dispatch(a, bucket=64)
    counts = plan.groups.counts
    buckets = [-(-n // 64) * 64 for n in loads]
    if equal:
        assert plan.groups.equal_rows == max(buckets) and counts.tolist() == [max(buckets)] * e
    else:
        assert plan.groups.equal_rows == 0 and counts.tolist() == buckets
    rows = int(counts.sum())
    assert plan.row_token.numel() == rows
    pair_row = plan.pair_row  # in slot order: for top-k the pairs' own order
    if pairs == "variable":
        slots = plan.slots
        assert torch.equal(slots.pair.sort().values, torch.arange(p))  # a permutation, pair_pos its inverse
        assert torch.equal(slots.pair[slots.pair_pos], torch.arange(p))
        assert torch.equal(slots.token_order[slots.token_pos], torch.arange(t))
        assert list(plan.sizes) == sorted(plan.sizes, reverse=True) and sum(plan.sizes) == p
        start = 0
        for s, n in enumerate(plan.sizes):  # slot s: the first n tokens by pairs per token, their s-th pair
            block = slots.pair[start:start + n]
            assert torch.equal(a.token[block], slots.token_order[:n])
            for j in block.tolist():
                assert int((a.token[:j] == a.token[j]).sum()) == s
            start += n
        pair_row = plan.pair_row[slots.pair_pos]  # back in pair order
    starts = torch.cumsum(counts, 0) - counts
    row_expert = torch.repeat_interleave(torch.arange(e), counts)
    assert torch.equal(row_expert[pair_row], pair_expert)  # each pair in its expert's group
    assert torch.equal(plan.row_token[pair_row], a.token)  # reading its token
    assert pair_row.unique().numel() == p  # one row per pair
    for ex in range(e):  # real rows first in each group, in pair order (stable)
        mine = pair_row[pair_expert == ex]
        assert torch.equal(mine, starts[ex] + torch.arange(loads[ex]))


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_bf16_autocast_matches_fp32_reference(path):
    layer = choose_path(make_layer("swiglu", dim=64, hidden=128, shared=64), path)
    x = torch.randn(2, 16, 64)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: relative error about 2^-8 per product, a few times that overall.
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_balance_loss_matches_eq5_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    # f_i = E/(k T) * count_i: counts (3, 3, 2); P_i = column means.
    e, k, t = 3, 2, 4
    f = torch.tensor([3.0, 3.0, 2.0]) * e / (k * t)
    p = probs.mean(0)
    # Both sides: positive terms, a mean over 4 tokens, 3 products and a 3-term sum in fp32, each
    # within ~8 roundings of u = EPS32 / 2 of the exact value; a miscounted f_i is off by >= 1/8.
    rtol = 8 * EPS32
    assert torch.allclose(balance_loss(probs, idx, e, 0.01), 0.01 * (f * p).sum(), rtol=rtol, atol=0)
    # Perfect balance gives alpha exactly (f_i = 1, P_i = 1/E).
    uniform = torch.full((6, 3), 1 / 3)
    idx_bal = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0]])
    assert torch.allclose(balance_loss(uniform, idx_bal, 3, 0.5), torch.tensor(0.5), rtol=rtol, atol=0)


def test_alpha_zero_works_and_gives_zero_loss():
    layer = MoE(16, 4, 2, 24, 32, aux_alpha=0.0)
    y, aux = layer(torch.randn(2, 5, 16), return_aux=True)
    assert aux.item() == 0.0
    y.sum().backward()  # no crash, unlike the official code


def test_renormalised_topk_weights_sum_to_one():
    layer = MoE(16, 8, 3, 24, 0, norm_topk=True)
    a = layer.gate(torch.randn(40, 16))
    idx, w, probs = a.expert_ids, a.weights, a.probs
    # Positive fp32 terms: the normalising sum, three quotients and their sum, one rounding of
    # u = EPS32 / 2 each, at most 6u = 3 * EPS32 from 1.
    assert torch.allclose(w.sum(-1), torch.ones(40), rtol=3 * EPS32, atol=0)
    assert torch.equal(idx.sort(-1).values, probs.topk(3).indices.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_swiglu_kernels_match_float64(dtype):
    """swiglu forward and backward in bf16 / fp16 on CPU against float64. Where the kernels compile
    they compute in fp32 and round once; where they cannot (no C++ compiler; inductor's code under
    ATEN_CPU_CAPABILITY=default) fused_swiglu.forward / backward return None, after one warning,
    and swiglu runs the eager ops, which round twice."""
    torch.manual_seed(0)
    hid = 40
    h = (2 * torch.randn(70, 2 * hid)).to(dtype)  # 70 rows: no multiple of a vector width
    grad = torch.randn(70, hid).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's one warning; its own test checks it
        out = fused_swiglu.forward(h, hid)
        dh = fused_swiglu.backward(grad, h, hid)
    fused = cpu_kernels.compiled()  # which path these calls, and swiglu's below, took
    assert (out is not None) == fused and (dh is not None) == fused
    h_leaf = h.clone().requires_grad_()
    y = fused_swiglu.swiglu(h_leaf, hid)  # fused=True: the kernels wherever they compile
    y.backward(grad)
    assert cpu_kernels.compiled() == fused
    assert y.dtype == h_leaf.grad.dtype == dtype and h_leaf.grad.shape == h.shape
    if fused:  # swiglu calls the same compiled kernels on the same inputs
        assert torch.equal(y, out) and torch.equal(h_leaf.grad, dh)
    h64 = h.double().requires_grad_()
    gate, up = h64[:, :hid], h64[:, hid:]
    ref = F.silu(gate) * up
    ref.backward(grad.double())
    with torch.no_grad():
        sig, g64 = torch.sigmoid(gate), grad.double()
        # The fp32 evaluation before any rounding into the dtype: sigmoid (exp within an ulp, a sum,
        # a quotient) and the products, <= 8 roundings of u32 = 4 EPS32 relative to each product's
        # size; silu's derivative sig * (1 + gate * (1 - sig)) cancels near gate = -1.28, so there
        # its error is relative to sig * (1 + |gate|), with 1 - sig as exact as sig: twice that.
        slack_out = 4 * EPS32 * ref.abs()
        slack_dh = torch.cat([8 * EPS32 * (g64 * up * sig).abs() * (1 + gate.abs()),
                              4 * EPS32 * (g64 * F.silu(gate)).abs()], dim=-1)
        # Kernel: one rounding (u relative, or half a subnormal spacing). Eager: silu rounds into
        # the dtype and the product again; backward, grad * up (or silu) rounds, then the result.
        # An underflow of the eager ops' first rounding (silu, grad * up) is then scaled by the other
        # factor (up; silu' <= 1.1; grad).
        u = roundings_tol(dtype, 1 if fused else 2)
        tiny_out = underflow_tol(dtype) * (1 + (0 if fused else up.abs()))
        tiny_dh = underflow_tol(dtype) * (1 + (0 if fused else torch.cat([torch.full_like(up, 1.1), g64.abs()], -1)))
        assert ((y.double() - ref).abs() <= u * ref.abs() + (1 + u) * slack_out + tiny_out).all()
        assert ((h_leaf.grad.double() - h64.grad).abs() <= u * h64.grad.abs() + (1 + u) * slack_dh + tiny_dh).all()


def test_fused_swiglu_falls_back_to_eager_with_a_warning_when_compilation_fails(compiler_fails):
    layer = kernels.apply(make_layer("swiglu"))
    x = torch.randn(2, 10, 16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="could not compile the fused CPU kernels") as caught:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().sum().backward()  # the backward goes straight to the eager ops
    assert len([w for w in caught if "fused CPU kernels" in str(w.message)]) == 1
    kernels.apply(layer, fused=False)
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = layer(x2)
    y2.float().sum().backward()
    # The failed compile ran the same eager ops in the same order: bit for bit.
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)


def test_reference_dispatcher_takes_any_number_of_experts_per_token():
    """An assignment that is not top-k (tokens with no expert, one, or three, in any pair order)
    through the reference dispatcher and experts, and through the fast dispatcher's plan,
    against a per-pair float64 sum."""
    torch.manual_seed(3)
    e, d, t = 4, 16, 6
    experts = Experts(e, d, 24, "swiglu")
    token = torch.tensor([0, 2, 2, 2, 3, 5, 5, 1])  # token 4 has no expert
    expert = torch.tensor([1, 0, 3, 2, 3, 3, 0, 1])
    weight = torch.rand(8)
    a = Assignment(token, expert, weight, torch.full((t, e), 1.0 / e))
    x = torch.randn(t, d)
    ref = torch.zeros(t, d, dtype=torch.float64)
    for tok, ex, w in zip(token.tolist(), expert.tolist(), weight.double()):
        h = x[tok].double() @ experts.w_in[ex].double()
        ref[tok] += w * ((F.silu(h[:24]) * h[24:]) @ experts.w_out[ex].double())
    for dispatcher in (Dispatcher(), kernels.FastDispatcher()):
        rows, plan = dispatcher.dispatch(x, a)
        y = dispatcher.combine(experts(rows, plan.groups), plan, a)
        assert_close_fp32(y, ref, 24, MOE_CHAIN)
        assert y[4].abs().sum() == 0


# ------------------------------------------------------------------------- variable-pair assignments
VARIABLE_PAIRS = ["expert_choice", "race", "race-inference", "token_pool", "token_pool-inference", "prototype",
                  "planted"]
NULL = 10  # the prototype router's null label (num_classes 10): image 1 below is unconditional


class PlantedPairs(Router):
    """Planted (token, expert) pairs in shuffled pair order: token 0 has none, token 1 every
    expert, the others 0 to E; weighted by the sigmoid of the gate's logits (so the gate weight
    gets gradients)."""

    def __init__(self, dim: int, num_experts: int, tokens: int):
        super().__init__(num_experts, dim)
        g = torch.Generator().manual_seed(2)
        per = torch.randint(0, num_experts + 1, (tokens,), generator=g)
        per[0], per[1] = 0, num_experts
        pairs = [(t, ex) for t in range(tokens) for ex in torch.randperm(num_experts, generator=g)[:per[t]].tolist()]
        self.pairs = torch.tensor(pairs)[torch.randperm(len(pairs), generator=g)]

    def forward(self, x, cond=None):
        s = torch.sigmoid(router_logits(x, self.weight))
        token, expert = self.pairs.unbind(1)
        return Assignment(token, expert, s[token, expert], s)


def variable_pair_layer(case: str, dtype: torch.dtype = torch.float64, shared: int = 32) -> MoE:
    """make_layer's MoE (dim 16, 4 experts, k 2) with a router whose pairs per token vary: the
    rule `case` names, in training or (after one threshold update) at inference."""
    kind, _, mode = case.partition("-")
    torch.manual_seed(0)
    knobs = {"expert_choice": {"capacity_factor": 1.5}, "token_pool": {"capacity_factor": 0.7},
             "prototype": {"num_classes": NULL}}.get(kind, {})
    router = PlantedPairs(16, 4, 24) if kind == "planted" else build_router(kind, 16, 4, 2, **knobs)
    layer = MoE(16, 4, 2, 24, shared, router=router).to(dtype).train(mode != "inference")
    if mode == "inference":  # thresholds as a trained model has them
        with torch.no_grad():
            if kind == "race":
                layer.gate.threshold.fill_(0.5)
            else:
                layer.gate.thresholds.copy_(torch.tensor([0.3, 0.5, 0.45, 0.6]))
            layer.gate.threshold_updates.fill_(1)
    return layer


VARIABLE_LAYOUTS = {"unpadded": {"row_bucket": 0}, "padded": {"row_bucket": 8},
                    "equal-groups": {"row_bucket": 8, "max_padding": 1e9}, "exact": {"row_bucket": 8}}


@pytest.mark.parametrize("layout", list(VARIABLE_LAYOUTS))
@pytest.mark.parametrize("case", VARIABLE_PAIRS)
def test_variable_pair_routers_give_the_reference_result(case, layout):
    """Assignments with any number of pairs per token (zero included) take the fast plan: unpadded,
    padded to multiples of 8 rows (equal groups where max_padding allows), padded to equal groups
    always, or exact (expert parallelism's dispatcher: never pads, whatever row_bucket says). In
    float64 the output and the gradients of x, the gate weight and the expert weights equal the
    reference dispatcher's up to summation order."""
    ref = variable_pair_layer(case)
    fast = kernels.apply(copy.deepcopy(ref), **VARIABLE_LAYOUTS[layout])
    fast.dispatcher.exact = layout == "exact"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 16, generator=g, dtype=torch.float64)
    cond = torch.tensor([1, NULL, 3]) if case == "prototype" else None
    a = fast.gate.route(x, cond)
    assert a.k == 0
    if case == "planted":  # tokens without pairs and with every expert
        per = a.pairs_per_token()
        assert per.min() == 0 and per.max() == 4
    _, plan = fast.dispatcher.dispatch(x.reshape(24, 16), a)
    rows, exact_rows = plan.groups.counts, expert_counts(a.expert, 4)
    if layout in ("unpadded", "exact"):
        assert torch.equal(rows, exact_rows) and plan.groups.equal_rows == 0
    else:
        padded = (exact_rows + 7) // 8 * 8
        assert (rows % 8 == 0).all() and (rows >= exact_rows).all()
        equal = layout == "equal-groups" or padded.max() * 4 <= 1.2 * padded.sum()
        assert (plan.groups.equal_rows > 0) == equal
        assert torch.equal(rows, torch.full_like(rows, int(padded.max())) if equal else padded)
    grad = torch.randn(3, 8, 16, generator=g, dtype=torch.float64)
    got = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = layer(xi, cond)
        y.backward(grad)
        got.append({"out": y.detach(), "x": xi.grad, "gate": layer.gate.weight.grad,
                    "w_in": layer.experts.w_in.grad, "w_out": layer.experts.w_out.grad})
    for name, want in got[0].items():
        chain = MOE_CHAIN if name == "out" else 2 * MOE_CHAIN
        assert rel_err(got[1][name], want) <= fp64_tol(MOE_K, chain), f"{case} {layout} {name}"


@pytest.mark.parametrize("layout", ["padded", "equal-groups"])
@pytest.mark.parametrize("case", ["expert_choice", "race", "token_pool", "prototype", "planted"])
def test_variable_pairs_bf16_padded_path_matches_reference_path(case, layout):
    """In bf16 on CPU (autocast) the fast plan pads every expert group to 64 rows (layout padded:
    never to equal groups; equal-groups: the default max_padding, which 4 small groups of 64 meet)
    and casts before the gather; the output stays within bf16 rounding of the reference path's.

    Both paths route the same (fp32 routers), cast x and the weights alike and run the same
    expert ops (the fused SwiGLU off; no shared expert), so the expert outputs differ only by
    the order of fp32 accumulation in the two products before their bf16 roundings:
    bf16_order_tol(24, 2) relative (K = 24 the experts' width). The per-token weighted sum
    rounds each product and each sum (reference: w * row, then index_add; fast: a product and one
    fused multiply-add per further slot, counted as two roundings): at most 2 m - 1 roundings
    per path, m the token's pairs, each within u = BF16_EPS / 2 of A = the sum of |w * expert
    output| over its pairs (a bound on every partial sum). Independent, as in tolerances.py, they
    add to sqrt(2 m - 1) u A per path, and the two paths differ by less than 2 sqrt(m) u A."""
    ref = variable_pair_layer(case, torch.float32, shared=0)
    fast = kernels.apply(copy.deepcopy(ref), fused=False, max_padding=None if layout == "padded" else 0.2)
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([1, NULL, 3]) if case == "prototype" else None
    a = ref.gate.route(x, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x, cond), fast(x, cond)
        _, plan = fast.dispatcher.dispatch(x.reshape(24, 16), a)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert (plan.groups.counts == 64).all() and (plan.groups.equal_rows == 64) == (layout == "equal-groups")
    # A and m from float64 expert outputs of the same pairs.
    ex, flat = ref.experts, x.reshape(24, 16).double()
    h = torch.einsum("pd,pdh->ph", flat[a.token], ex.w_in.double()[a.expert])
    out = torch.einsum("ph,phd->pd", F.silu(h[:, :24]) * h[:, 24:], ex.w_out.double()[a.expert])
    big_a = torch.zeros(24, 16, dtype=torch.float64).index_add_(0, a.token, (a.weight.double()[:, None] * out).abs())
    m = a.pairs_per_token().double()[:, None]
    norm = y_ref.double().norm()
    tol = (bf16_order_tol(24, 2) * big_a.norm() + 2 * m.sqrt().mul(big_a).norm() * BF16_EPS / 2) / norm
    assert rel_err(y, y_ref) <= tol.item(), case
