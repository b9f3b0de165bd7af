"""Faster equivalents of the DiT's layers (`ditmoe.models`), same parameters, same function.

Each class here subclasses a reference layer and overrides only its forward (or a helper of it);
`ditmoe.kernels.apply` swaps a module's class in place, so parameter names, the module tree,
hooks and optimizer references stay as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.dit import DiTBlock, FinalLayer
from ..models.layers import Attention, PatchEmbed, SwiGLU, compute_dtype
from . import cpu_kernels
from .fused_adaln import gated_residual, norm_modulate
from .fused_swiglu import swiglu
from .weight_casts import cast_weight


class FastPatchEmbed(PatchEmbed):
    """The patch embedding with a contiguous (N, T, D) output.

    Eagerly, a (T, D)-strided residual stream makes every later elementwise op strided and can
    turn token-wise products into batched ones, so it is made contiguous. A compiled graph
    chooses its own layouts, and inductor's CPU training step ran slower with the contiguous
    stream (docs/performance.md), so under torch.compile it is left as is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x if torch.compiler.is_compiling() else x.contiguous()


def recomputed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q, k, v (N, H, T, Dh).

    PyTorch's fused (flash) attention everywhere, except for the backward of bf16 training on
    CPU, where its kernel is slower than batched products: there `_RecomputedAttention` keeps
    the flash forward and recomputes the attention matrix in the backward.
    """
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad) and not torch.compiler.is_compiling()):
        return _RecomputedAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class _RecomputedAttention(torch.autograd.Function):
    """Flash-attention forward; backward from the recomputed (N, H, T, T) probabilities.

    Saves only q, k, v (no output, no log-sum-exp), like the flash kernel holds no T x T matrix
    between forward and backward; the matrix exists only inside the backward of one layer.
    The backward is the textbook one: dV = P^T dO, dP = dO V^T, dS = softmax'(dP),
    dQ = dS K s, dK = dS^T Q s, in bf16 products with fp32 accumulation inside each kernel.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        qs = q * scale
        probs = torch.softmax(torch.matmul(qs, k.transpose(-1, -2)), dim=-1)
        grad = grad.to(q.dtype)
        dv = torch.matmul(probs.transpose(-1, -2), grad)
        dscores = torch.ops.aten._softmax_backward_data(torch.matmul(grad, v.transpose(-1, -2)), probs, -1, probs.dtype)
        del probs
        dq = torch.matmul(dscores, k).mul_(scale)
        dk = torch.matmul(dscores.transpose(-1, -2), qs)
        return dq, dk, dv


class FastAttention(Attention):
    """Attention whose bf16 CPU training backward recomputes the probabilities."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return recomputed_attention(q, k, v)


class FastSwiGLU(SwiGLU):
    """Where the compiled CPU kernels apply (`fused`), one product for [gate | up] (x cast once,
    not twice) and the one-pass SwiGLU; elsewhere the reference forward."""

    fused: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        if cpu_kernels.applies(x, dt, self.fused):
            hidden = self.gate_proj.out_features
            w = torch.cat([cast_weight(self.gate_proj.weight, dt), cast_weight(self.up_proj.weight, dt)])
            h = F.linear(x.to(dt), w).reshape(-1, 2 * hidden)
            return self.down_proj(swiglu(h, hidden).view(*x.shape[:-1], hidden))
        return super().forward(x)


class FastDiTBlock(DiTBlock):
    """The block with LayerNorm + modulate and the gated residual as one-pass CPU kernels
    (`fused`; `fused_adaln`), the plain ops wherever those do not apply."""

    fused: bool = True

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor | None = None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        fused = self.fused
        x = gated_residual(x, gate_msa, self.attn(norm_modulate(self.norm1, x, shift_msa, scale_msa, fused=fused)),
                           fused=fused)
        # The MoE router computes in fp32, so its input stays in the residual stream's dtype.
        h, aux = self.feed_forward(norm_modulate(self.norm2, x, shift_mlp, scale_mlp, keep_dtype=self.is_moe,
                                                 fused=fused), y)
        return gated_residual(x, gate_mlp, h, fused=fused), aux


class FastFinalLayer(FinalLayer):
    fused: bool = True

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(norm_modulate(self.norm_final, x, shift, scale, fused=self.fused))


__all__ = ["FastAttention", "FastDiTBlock", "FastFinalLayer", "FastPatchEmbed", "FastSwiGLU", "recomputed_attention"]
