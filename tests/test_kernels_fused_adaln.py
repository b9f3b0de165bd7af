"""The compiled adaLN kernels (LayerNorm + modulate, gated residual) against float64 formulas,
and the DiT model with them against the same model on the eager ops."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ditmoe import kernels
from ditmoe.config import ModelConfig
from ditmoe.kernels import cpu_kernels
from ditmoe.kernels.fused_adaln import gated_residual, norm_modulate
from ditmoe.models.dit import DiT
from ditmoe.models.layers import PatchEmbed, SwiGLU, modulate
from tolerances import EPS32, fp32_tol, roundings_tol, underflow_tol


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(dtype, strided=False, seed=0):
    """x (fp32 residual stream), shift, scale, gate (the adaLN outputs, in the product dtype)."""
    g = torch.Generator().manual_seed(seed)
    n, t, d = 3, 7, 40  # no multiple of a vector width
    x = 3 * torch.randn(n, t, d, generator=g) + 1
    if strided:  # (T, D) stored D-major, as a patch embedding's transpose leaves it
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    shift, scale, gate = (torch.randn(n, d, generator=g).to(dtype) for _ in range(3))
    return x, shift, scale, gate


def kernel_path(call) -> bool:
    """Run `call` once: that compiles the kernels it uses or, where compilation fails (no C++
    compiler; inductor's code under ATEN_CPU_CAPABILITY=default), warns once and marks them
    unavailable. Then say which path later calls take (cpu_kernels.compiled()): the tests check
    that path's contract."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's one warning; its own test checks it
        call()
    return cpu_kernels.compiled()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep_dtype", [False, True], ids=["out-in-product-dtype", "out-in-fp32"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-x", "strided-x"])
def test_norm_modulate_matches_float64(dtype, keep_dtype, strided):
    x, shift, scale, _ = inputs(dtype, strided)
    norm = nn.LayerNorm(x.shape[-1], elementwise_affine=False, eps=1e-6)
    d, t = x.shape[-1], x.shape[1]

    def run():
        leaves = [v.detach().clone().requires_grad_() for v in (x, shift, scale)]
        with torch.autocast("cpu", dtype=dtype):
            y = norm_modulate(norm, *leaves, keep_dtype=keep_dtype)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
        y.backward(grad)
        return y, grad, [leaf.grad for leaf in leaves]

    fused = kernel_path(run)
    y, grad, got = run()
    assert cpu_kernels.compiled() == fused  # the path did not change on the way
    # The kernel rounds once into the product dtype (or fp32 with keep_dtype); the eager ops are
    # LayerNorm in fp32 and modulate with the half-precision shift and scale, promoting to fp32.
    assert y.dtype == ((torch.float32 if keep_dtype else dtype) if fused else torch.float32)
    assert y.is_contiguous()  # both: eager LayerNorm's output is contiguous, the kernel makes it so
    assert [g.dtype for g in got] == [torch.float32, dtype, dtype]

    ref_leaves = [leaf.detach().double().requires_grad_() for leaf in (x, shift, scale)]
    x64, shift64, scale64 = ref_leaves
    ref = modulate(F.layer_norm(x64, x64.shape[-1:], eps=1e-6), shift64, scale64)
    ref.backward(grad.double())
    with torch.no_grad():
        var, mean = torch.var_mean(x64, dim=-1, keepdim=True, correction=0)
        rstd = (var + 1e-6).rsqrt()
        one_plus = 1 + scale64.unsqueeze(1)
        a = (x64 - mean) * rstd * one_plus  # the normalised, scaled term
        # fp32 evaluation before any rounding to the output dtype: the mean and variance (two
        # length-D reductions, plus the elementwise steps: chain 3) err relative to |x| + |mean|,
        # not to the centred x; the product and the shift's sum one fp32 rounding each (2 EPS32).
        slack = fp32_tol(d, 3) * (x64.abs() + mean.abs()) * rstd * one_plus.abs() + 2 * EPS32 * (a.abs() + shift64.abs().unsqueeze(1))
        u_dt = roundings_tol(dtype, 1)
        if fused:  # one rounding of the fp32 value into y's dtype
            u_out = roundings_tol(y.dtype, 1)
            bound = u_out * ref.abs() + (1 + u_out) * slack + underflow_tol(y.dtype)
        else:  # eager: 1 + scale rounds to the half-precision dtype (u relative on the scaled term)
            bound = u_dt * a.abs() + slack
        assert ((y.double() - ref).abs() <= bound).all(), ((y.double() - ref).abs() - bound).max()
        # dx stays in fp32: LayerNorm's backward (three length-D reductions and the forward
        # statistics: chain 4) relative to the scale of its input rstd * grad * (1 + scale), which the
        # projection onto the centred, decorrelated directions shrinks by `cond`; the eager ops
        # also round 1 + scale into the dtype, a relative u on that input.
        gx = grad.double() * one_plus * rstd
        cond = (gx.norm() / x64.grad.norm()).item()
        tol = ((0.0 if fused else u_dt) + fp32_tol(d, 4)) * cond
    assert rel(got[0], x64.grad) <= tol, (rel(got[0], x64.grad), tol)
    # d_shift, d_scale: fp32 sums over the T tokens of grad (times xhat), rounded once into the dtype.
    for g, r in zip(got[1:], ref_leaves[1:]):
        assert rel(g, r.grad) <= u_dt + fp32_tol(max(d, t), 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-x", "strided-x"])
def test_gated_residual_matches_float64(dtype, strided):
    x, _, _, gate = inputs(dtype, strided)
    y = torch.randn(x.shape).to(dtype)
    grad = torch.randn(x.shape)
    t = x.shape[1]

    def run():
        leaves = [v.detach().clone().requires_grad_() for v in (x, gate, y)]
        out = gated_residual(*leaves)
        out.backward(grad)
        return out, [leaf.grad for leaf in leaves]

    fused = kernel_path(run)
    out, got = run()
    assert cpu_kernels.compiled() == fused
    assert out.dtype == torch.float32
    # The kernel writes a contiguous stream; the eager ops keep x's layout.
    assert out.is_contiguous() if fused else out.stride() == x.stride()
    ref_leaves = [leaf.detach().double().requires_grad_() for leaf in (x, gate, y)]
    x64, gate64, y64 = ref_leaves
    ref = x64 + gate64.unsqueeze(1) * y64
    ref.backward(grad.double())
    u32, u_dt = EPS32 / 2, roundings_tol(dtype, 1)
    with torch.no_grad():
        gy = (gate64.unsqueeze(1) * y64).abs()
        # Kernel: gate * y is exact in fp32 (two 8- or 11-bit significands), so out is one fp32
        # rounding of the exact sum. Eager: the product rounds into the dtype first, then the sum in fp32.
        bound = u32 * ref.abs() if fused else u_dt * gy + u32 * (ref.abs() + u_dt * gy)
        assert ((out.double() - ref).abs() <= bound).all()
    assert torch.equal(got[0], grad)  # d out / d x is the identity: no arithmetic on either path
    # d gate = sum over T of grad * y, d y = grad * gate. Kernel: in fp32, rounded once into the
    # dtype. Eager: grad rounds into the dtype (the product's gradient), then the product rounds,
    # and for d gate the sum over T once more.
    gate_tol = (u_dt if fused else roundings_tol(dtype, 3)) + fp32_tol(t)
    y_tol = u_dt + EPS32 if fused else roundings_tol(dtype, 2)
    for g, r, tol in zip(got[1:], ref_leaves[1:], (gate_tol, y_tol)):
        assert g.dtype == dtype and rel(g, r.grad) <= tol, (rel(g, r.grad), tol)


def test_fp32_takes_the_eager_ops_unchanged(monkeypatch):
    """Without a half-precision product dtype nothing is compiled and results are bit for bit
    the eager ones (the official-parity path)."""
    def no_kernels(*a, **k):
        raise AssertionError("a compiled kernel was called in fp32")

    monkeypatch.setattr(cpu_kernels, "run", no_kernels)
    x, shift, scale, gate = inputs(torch.float32)
    norm = nn.LayerNorm(x.shape[-1], elementwise_affine=False, eps=1e-6)
    assert torch.equal(norm_modulate(norm, x, shift, scale), modulate(norm(x), shift, scale))
    assert torch.equal(gated_residual(x, gate, x), x + gate.unsqueeze(1) * x)
    mlp = kernels.apply(SwiGLU(40, 24))
    assert torch.equal(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))


def test_swiglu_module_one_projection_matches_float64():
    """In bf16 on CPU the shared expert runs [gate | up] as one product and the one-pass SwiGLU;
    outputs and weight gradients against float64."""
    torch.manual_seed(0)
    mlp = kernels.apply(SwiGLU(40, 24))
    x = torch.randn(2, 9, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    assert y.dtype == torch.bfloat16
    grad = torch.randn(y.shape)
    y.float().backward(grad)
    ref_mlp = SwiGLU(40, 24).double()
    ref_mlp.load_state_dict(mlp.state_dict())
    x64 = x.detach().double().requires_grad_()
    ref = ref_mlp.down_proj(F.silu(ref_mlp.gate_proj(x64)) * ref_mlp.up_proj(x64))
    ref.backward(grad.double())
    assert rel(y, ref) < 1e-2
    assert rel(x.grad, x64.grad) < 1e-2
    for (name, p), p64 in zip(mlp.named_parameters(), ref_mlp.parameters()):
        assert rel(p.grad, p64.grad) < 1e-2, name


def test_patch_embedding_gives_a_contiguous_stream():
    emb = kernels.apply(PatchEmbed(2, 4, 32))
    assert emb(torch.randn(2, 4, 8, 8)).is_contiguous()


def small_moe_dit() -> DiT:
    cfg = ModelConfig(name="t", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                      num_classes=10, num_experts=4, top_k=2)
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():  # adaLN-Zero starts with zero gates; give them something to carry
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(std=0.05)
    return model


def test_dit_in_bf16_with_the_kernels_is_as_close_to_fp32_as_with_eager_ops():
    """The whole model: output and every parameter gradient in bf16 (compiled kernels, then
    eager ops) against fp32; the kernels may not be further from fp32 than the eager ops."""
    model = small_moe_dit()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g), torch.randint(0, 10, (4,), generator=g)

    def run(dtype, fused):
        kernels.apply(model, fused=fused)
        model.zero_grad()
        torch.manual_seed(2)  # the same label dropout (training mode draws it) in every run
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = model(x, t, y)
        out.float().square().mean().backward()
        return out.float().detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run(None, False)
    compiled_kernels = kernel_path(lambda: run(torch.bfloat16, True))
    errors = {}
    for fused in (True, False):
        out, grads = run(torch.bfloat16, fused)
        assert grads.keys() == ref_grads.keys()
        errors[fused] = [rel(out, ref_out)] + [rel(grads[n], ref_grads[n]) for n in ref_grads]
    if not compiled_kernels:  # no kernels here: both runs took the same eager ops in the same order, bit for bit
        assert errors[True] == errors[False]
        return
    assert max(errors[True]) < 0.05, max(errors[True])
    # Per quantity, the kernels' error is at most the eager ops' (with a margin for the rounding
    # noise of the products, which both share).
    assert sum(errors[True]) <= 1.1 * sum(errors[False])


def test_adaln_kernels_fall_back_to_eager_when_compilation_fails(compiler_fails):
    model = kernels.apply(small_moe_dit())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,))
    with pytest.warns(RuntimeWarning, match="could not compile the fused CPU kernels") as caught:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().sum().backward()
    assert len([w for w in caught if "fused CPU kernels" in str(w.message)]) == 1
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    kernels.apply(model, fused=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2 = model(x, t, y)
    out2.float().sum().backward()
    # The failed call ran the same formulas eagerly; later calls are the plain eager ops.
    assert rel(out, out2) < 1e-2
    new = dict(model.named_parameters())
    assert all(rel(g, new[n].grad) < 2e-2 for n, g in grads.items() if g.norm() > 0)
