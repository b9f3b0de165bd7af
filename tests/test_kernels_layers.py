"""Attention's CPU bf16 training path against float64 scaled-dot-product attention."""

import pytest
import torch
import torch.nn.functional as F

from ditmoe import kernels
from ditmoe.kernels.layers import recomputed_attention as attention
from ditmoe.models.layers import Attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("head_dim", [16, 24])  # 1/sqrt(24) is not a power of two: q * scale rounds in bf16
def test_recomputed_attention_matches_float64_reference(head_dim):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, head_dim).bfloat16().requires_grad_() for _ in range(3))
    g = torch.randn(2, 3, 40, head_dim)
    out = attention(q, k, v)
    assert type(out.grad_fn).__name__ == "_RecomputedAttentionBackward"  # the fast path was taken
    out.backward(g.bfloat16())
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64)
    ref.backward(g.double())
    # A few bf16 roundings deep (2^-8 relative each); torch's own bf16 kernel lands at about 3e-3.
    assert rel(out, ref) < 1e-2
    for name, got, want in [("q", q.grad, q64.grad), ("k", k.grad, k64.grad), ("v", v.grad, v64.grad)]:
        assert got.dtype == torch.bfloat16
        assert rel(got, want) < 1.5e-2, name


def test_other_cases_use_torch_attention_unchanged():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v)  # fp32: torch's kernel, whose backward is fast here
    assert type(out.grad_fn).__name__ != "_RecomputedAttentionBackward"
    # attention() hands these cases to the same torch kernel on the same inputs: bit for bit.
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    with torch.no_grad():
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        torch.testing.assert_close(attention(qb, kb, vb), F.scaled_dot_product_attention(qb, kb, vb), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["qkv", "fused_qknorm"])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_attention_module_bf16_training_matches_fp32(layout, path):
    torch.manual_seed(0)
    attn = Attention(32, 4, layout)
    if path == "fast":
        kernels.apply(attn)
    x = torch.randn(2, 20, 32, requires_grad=True)
    g = torch.randn(2, 20, 32)
    ref = attn(x)
    ref.backward(g)
    want = {n: p.grad.clone() for n, p in attn.named_parameters()}
    want_x, x.grad = x.grad.clone(), None
    attn.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    out.float().backward(g)
    q = torch.randn(1, 2, 8, 8).bfloat16().requires_grad_()
    assert (type(attn.attend(q, q, q).grad_fn).__name__ == "_RecomputedAttentionBackward") == (path == "fast")
    assert rel(out, ref) < 2e-2 and rel(x.grad, want_x) < 2e-2
    for n, p in attn.named_parameters():
        if n == "k_norm.bias":
            continue  # exactly zero in exact arithmetic (softmax ignores a shift shared by all keys)
        # The 8-element norm gradients sum over every token: torch's own bf16 kernel lands at
        # up to 2e-2 on them as well.
        assert rel(p.grad, want[n]) < 3e-2, n
