"""Tolerances of the float comparisons in the tests, derived once from each format's rounding unit.

fp32: a length-K reduction of data of random sign, summed in some order, carries a rounding error
of about sqrt(K) * u relative to its result (u = EPS32 / 2 the unit roundoff; the per-addition
errors are independent, Higham & Mary 2019, "A new approach to probabilistic rounding error
analysis"; blocked or pairwise sums, as vectorised kernels do, are smaller still). Two evaluations
that sum in different orders (another CPU's kernels, a dense product against grouped expert
products, the official code against this package) then differ by at most 2 * sqrt(K) * u =
sqrt(K) * EPS32 per reduction. Through a chain of `chain` reductions joined by well-conditioned
steps (LayerNorm, softmax, GELU / SiLU, residual adds: condition about 1) the relative errors add,
at worst linearly: chain * sqrt(K) * EPS32, K the longest reduction. Measured over the whole
tensor (norm-relative, not element by element, whose small elements have no relative bound) this
holds with a wide margin on any CPU; any wrong formula, layout or index is off by far more.

bf16 / fp16: one rounding of a value computed in fp32 is within BF16_EPS / FP16_EPS relative; the
bf16 tests state their own chains of such roundings.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23 = 2u
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7 = 2u
FP16_EPS = torch.finfo(torch.float16).eps  # 2^-10 = 2u

# The tiny fixture DiTs (tests/fixtures/official: hidden 64, MLP width 256, 16 tokens, head_dim 16,
# depth 2): per block ten chained reductions (adaLN, LayerNorm, qkv, q.k, softmax, p.v, proj,
# LayerNorm, MLP in, MLP out), outside the blocks six (patch embedding, the two timestep-MLP
# products, final adaLN, LayerNorm, linear); the longest reduction is the MLP's 256.
TINY_DIT_K = 256
TINY_DIT_CHAIN = 10 * 2 + 6
# A backward pass mirrors the forward chain (each product's dX and dW are reductions of their own;
# dW reduces over the 6 * 16 = 96 tokens, shorter than 256).
TINY_DIT_GRAD_CHAIN = 2 * TINY_DIT_CHAIN


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-relative error ||actual - expected||_2 / ||expected||_2, computed in float64."""
    a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((a - e).norm() / e.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


def fp32_tol(reduction_len: int, chain: int = 1) -> float:
    """chain * sqrt(K) * EPS32: two fp32 evaluations in different summation orders (module docstring)."""
    return chain * math.sqrt(reduction_len) * EPS32


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, reduction_len: int, chain: int = 1,
                      what: str = "") -> None:
    """Same shape, and norm-relative error within fp32_tol(reduction_len, chain). `expected` may be
    another fp32 evaluation or a float64 reference (then the bound holds with a factor 2 to spare)."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, tol = rel_err(actual, expected), fp32_tol(reduction_len, chain)
    assert err <= tol, f"{what}: norm-relative error {err:.3g} > {tol:.3g} (fp32, K={reduction_len}, chain={chain})"


def bf16_order_tol(reduction_len: int, chain: int = 1) -> float:
    """Two bf16 evaluations whose fp32 accumulations differ only in summation order (fp32_tol
    apart before rounding): an element rounds to the other neighbouring bf16 value only when it lies
    within fp32_tol of a rounding boundary, with probability fp32_tol / BF16_EPS, and then by one
    ulp (BF16_EPS relative); norm-relative sqrt(fp32_tol * BF16_EPS) per rounded step, chained
    steps adding as in fp32_tol."""
    return chain * math.sqrt(fp32_tol(reduction_len) * BF16_EPS)


def adam_weight_tol(grad_tol: float, lr: float, steps: int) -> float:
    """Root-mean-square difference of weights after `steps` Adam(W) steps (weight decay 0 or equal on
    both sides) from gradients within norm-relative `grad_tol` of each other (including a clip
    coefficient from the same gradients).

    Adam's update m_hat / (sqrt(v_hat) + eps) is at most about 1 per element (Cauchy-Schwarz on the
    bias-corrected moments) and homogeneous of degree 0 in the gradients: an element g moves by about
    min(2, 2 * dg / |g|) for an absolute gradient error dg. The error spreads as dg ~ grad_tol * sigma
    (sigma the tensor's RMS gradient), and over gradients of density <= 0.4 / sigma at 0 (a Gaussian's)
    the mean square of that is <= 4 * 0.8 * grad_tol (elements that flip sign, |g| < dg) + the same
    again from the 1 / g^2 tail: 6.4 * grad_tol < 8 * grad_tol. Steps add: steps * lr * sqrt(8 * grad_tol).
    An elementwise bound does not exist (a gradient element at rounding-noise level flips its
    update by 2 * lr), which is why this is an RMS over the tensor."""
    return steps * lr * math.sqrt(8 * grad_tol)


def rms_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Root-mean-square of actual - expected, in float64."""
    a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return (a - e).square().mean().sqrt().item() if e.numel() else 0.0


def roundings_tol(dtype: torch.dtype, n: int) -> float:
    """Relative bound after n roundings to `dtype` (unit roundoff u = eps / 2 each): (1 + u)^n - 1."""
    return (1 + torch.finfo(dtype).eps / 2) ** n - 1


def underflow_tol(dtype: torch.dtype) -> float:
    """Absolute error of one rounding into `dtype`'s subnormal range: half its spacing there."""
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps / 2

# The tiny AutoencoderKL of tests/test_data_latents.py (block_out_channels (8, 16), one ResNet block per
# stage, 8 groups, 32x32 images). Encoder path to (mean, logvar): conv_in; stage 1 ResNet (GroupNorm,
# conv, GroupNorm, conv) and the stride-2 conv; stage 2 ResNet (4); mid block: ResNet (4), attention
# (GroupNorm, q/k/v, q.k, softmax, p.v, out: 6), ResNet (4); GroupNorm, conv_out, quant_conv: 27
# chained reductions (SiLU, residual adds, the 1x1 shortcut: elementwise or shorter, in parallel).
# The longest reduction is stage 1's GroupNorm statistics over one channel's 32 x 32 pixels
# (convs: at most 16 * 9 = 144; attention: 256 tokens).
TINY_VAE_ENC_K = 32 * 32
TINY_VAE_ENC_CHAIN = 27

EPS64 = torch.finfo(torch.float64).eps  # 2^-52 = 2u


def fp64_tol(reduction_len: int, chain: int = 1) -> float:
    """fp32_tol for two float64 evaluations in different summation orders: chain * sqrt(K) * EPS64."""
    return chain * math.sqrt(reduction_len) * EPS64

# A uint8 level v (0..255) to [-1, 1] as v / 127.5 - 1 in fp32: the quotient (<= 2) rounds within
# 2u and the difference (<= 1 in size) within u (u = EPS32 / 2): 3u = 1.5 * EPS32 absolute from the
# exact value. Two sides that both compute it in fp32 with the same ops agree bit for bit (IEEE
# division and subtraction are correctly rounded on every CPU, vector or scalar).
PIXEL_F32_ABS = 1.5 * EPS32


def rounded_rel_tol(dtype: torch.dtype, expected: torch.Tensor, base_tol: float = 0.0) -> float:
    """Norm-relative bound between `expected` and one rounding into `dtype` of a value that was
    within norm-relative `base_tol` of it: u (1 + base_tol) + base_tol for the normal range, plus
    sqrt(n) * underflow_tol / ||expected|| for elements that land among the subnormals."""
    e = torch.as_tensor(expected).double()
    tiny = math.sqrt(e.numel()) * underflow_tol(dtype) / max(e.norm().item(), torch.finfo(torch.float64).tiny)
    return roundings_tol(dtype, 1) * (1 + base_tol) + base_tol + tiny


def sum_positive_order_tol(n: int, eps: float = EPS32) -> float:
    """Relative difference of two sums of the same n >= 0 terms in different orders: each is within
    gamma_{n-1} ~ (n - 1) u of the exact sum (Higham, worst case, no cancellation for terms of one
    sign), so they are apart by at most 2 (n - 1) u = (n - 1) * eps."""
    return max(n - 1, 1) * eps * (1 + n * eps)
