"""adaLN-Zero's elementwise work in one pass per direction, for bf16 / fp16 on CPU.

Each DiT block does twice: LayerNorm (no affine) of the fp32 residual stream, modulate
x * (1 + scale) + shift, a cast to the product dtype, and after the attention or MLP the gated
residual x + gate * f(x). Eagerly that is about six passes over (N, T, D) activations forward
and more backward, each memory-bound; here each is one compiled pass (`cpu_kernels`) that
computes in fp32 and rounds once. The forward saves x and the per-token mean and 1/std only
(eager LayerNorm + modulate keeps the normalised tensor as well).

`norm_modulate` and `gated_residual` fall back to the plain eager ops everywhere the compiled
kernels do not apply (fp32, GPUs, inside torch.compile), so those paths are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.layers import compute_dtype, modulate
from . import cpu_kernels


# --- the formulas the kernels are generated from (also their eager fallback) ---------------
def norm_modulate_math(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm(x) * (1 + scale) + shift in fp32, rounded once; also the mean and 1/std (N, T, 1)."""
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean) * rstd * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)
    # Contiguous, as eager LayerNorm's output, whatever x's strides: the products that read it
    # fold (N, T) into one matrix only when they can view it so.
    return y.to(out_dtype).contiguous(), mean, rstd


def norm_modulate_backward_math(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                scale: torch.Tensor, shift_dtype: torch.dtype
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients with respect to x, shift and scale, each in its input's dtype."""
    g = grad.float()
    xhat = (x.float() - mean) * rstd
    d_shift = g.sum(1)
    d_scale = (g * xhat).sum(1)
    gx = g * (1 + scale.float().unsqueeze(1))  # gradient with respect to xhat
    # LayerNorm's backward: project out the mean and the xhat direction, scale by 1/std.
    dx = rstd * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), d_shift.to(shift_dtype), d_scale.to(scale.dtype)


def gated_residual_math(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y in fp32, rounded once to x's dtype; gate (N, D), x and y (N, T, D)."""
    return (x.float() + gate.float().unsqueeze(1) * y.float()).to(x.dtype).contiguous()


def gated_residual_backward_math(grad: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients with respect to gate and y (that of x is the incoming gradient itself)."""
    g = grad.float()
    return (g * y.float()).sum(1).to(gate.dtype), (g * gate.float().unsqueeze(1)).to(y.dtype)


def _compiled_or_eager(name: str, fn, *args):
    out = cpu_kernels.run(name, fn, *args)
    return fn(*args) if out is None else out


class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps: float, out_dtype: torch.dtype):
        y, mean, rstd = _compiled_or_eager("norm_modulate", norm_modulate_math, x, shift, scale, eps, out_dtype)
        ctx.save_for_backward(x, mean, rstd, scale)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, scale = ctx.saved_tensors
        dx, d_shift, d_scale = _compiled_or_eager("norm_modulate_backward", norm_modulate_backward_math,
                                                  grad, x, mean, rstd, scale, ctx.shift_dtype)
        return dx, d_shift, d_scale, None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype
        return _compiled_or_eager("gated_residual", gated_residual_math, x, gate, y)

    @staticmethod
    def backward(ctx, grad):
        gate, y = ctx.saved_tensors
        d_gate, d_y = _compiled_or_eager("gated_residual_backward", gated_residual_backward_math, grad, gate, y)
        return grad.to(ctx.x_dtype), d_gate, d_y


def norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  keep_dtype: bool = False, fused: bool = True) -> torch.Tensor:
    """modulate(norm(x), shift, scale) for the block's affine-free LayerNorm `norm`.

    Where the compiled kernels apply, the result comes in the dtype the next products run in
    (so no separate cast), or in x's dtype with `keep_dtype` (for the MoE router, which routes
    in fp32). `fused=False`: always the eager ops.
    """
    dt = compute_dtype(x)
    if cpu_kernels.applies(x, dt, fused) and norm.weight is None and x.dim() == 3:
        return _NormModulate.apply(x, shift, scale, norm.eps, x.dtype if keep_dtype else dt)
    return modulate(norm(x), shift, scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """x + gate.unsqueeze(1) * y: the residual update of an adaLN-Zero block."""
    # Only where the result has x's dtype, as eager type promotion would give it.
    same_dtype = x.dtype == torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    if cpu_kernels.applies(x, y.dtype, fused) and same_dtype and x.dim() == 3:
        return _GatedResidual.apply(x, gate, y)
    return x + gate.unsqueeze(1) * y


__all__ = ["gated_residual", "norm_modulate"]
