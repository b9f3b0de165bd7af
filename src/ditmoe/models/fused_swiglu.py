"""SwiGLU's elementwise work in one pass per direction, for bf16 / fp16 on CPU.

On CPU the eager bf16 SwiGLU reads and writes the (M, 2H) expert projection several times:
silu and a product in the forward; silu again, two products and silu's derivative in the
backward. These passes are memory-bound, each costing about a copy of the tensor, and together
they were about a seventh of a DiT-MoE-S/2 training step. Kernels that torch.compile (inductor)
generates from the plain formulas below do each direction in one pass, computing in fp32 and
rounding once (so they are also a little more exact than the eager ops, which round the silu).

They are compiled on first use, once per process and for any number of rows: about 30 s on a
fresh 2-core machine, about 5 s once inductor's on-disk cache holds them. Where compilation fails
(no C++ compiler, say) a warning says so once and the eager ops run instead.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

# Set to False to use the eager ops everywhere (the tests compare the two).
ENABLED = True

_compiled: dict[str, Callable] = {}
_unavailable = False  # set after the first compilation failure: the compiler will not work later either


def swiglu_forward_math(h: torch.Tensor, hidden: int) -> torch.Tensor:
    """silu(h[:, :H]) * h[:, H:] computed in fp32, rounded once to h's dtype."""
    gate, up = h[:, :hidden].float(), h[:, hidden:].float()
    return (F.silu(gate) * up).to(h.dtype)


def swiglu_backward_math(grad: torch.Tensor, h: torch.Tensor, hidden: int) -> torch.Tensor:
    """Gradient with respect to h = [gate | up] of silu(gate) * up, one (M, 2H) tensor."""
    gate, up, g = h[:, :hidden].float(), h[:, hidden:].float(), grad.float()
    sig = torch.sigmoid(gate)
    # d silu(g) / dg = sig(g) * (1 + g * (1 - sig(g))); d / d up = silu(g).
    # Each half rounded before the cat: the compiled kernel then writes both straight into the
    # output, instead of an fp32 buffer and a second conversion pass.
    return torch.cat([(g * up * sig * (1 + gate * (1 - sig))).to(h.dtype), (g * gate * sig).to(h.dtype)], dim=-1)


def applies(h: torch.Tensor) -> bool:
    """Whether the compiled kernels serve this tensor: CPU, bf16 / fp16, not inside torch.compile
    (a compiled model fuses these ops itself)."""
    return (ENABLED and h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_compiling())


def _run(name: str, fn: Callable, *args) -> torch.Tensor | None:
    """The compiled `fn(*args)`, or None (after one warning) where it cannot be compiled."""
    global _unavailable
    if _unavailable:
        return None
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[name](*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: use the eager ops
        _unavailable = True
        warnings.warn(f"ditmoe: could not compile the fused SwiGLU kernels ({type(e).__name__}: {e}); "
                      "using the eager ops, which are correct but slower on CPU", RuntimeWarning, stacklevel=3)
        return None


def forward(h: torch.Tensor, hidden: int) -> torch.Tensor | None:
    """Fused forward, or None where the caller should run its eager ops."""
    return _run("forward", swiglu_forward_math, h, hidden)


def backward(grad: torch.Tensor, h: torch.Tensor, hidden: int) -> torch.Tensor | None:
    """Fused backward, or None where the caller should run its eager ops."""
    return _run("backward", swiglu_backward_math, grad, h, hidden)
