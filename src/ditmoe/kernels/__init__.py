"""Speed layers for the reference model of `ditmoe.models`, applied from outside.

`apply(model)` swaps, in place, each layer of a built model for a faster equivalent with the
same parameters (`kernels.layers`, `kernels.moe`): the MoE's dispatcher and experts (slot-major
plan with written-out backward passes, padded and equal-size expert groups on CPU in bf16,
batched products, cached weight casts), the blocks' LayerNorm + modulate and gated residual and
the SwiGLU as one-pass compiled CPU kernels in bf16 / fp16 (`cpu_kernels`, `fused_adaln`,
`fused_swiglu`), attention's recomputed backward in bf16 CPU training, and a contiguous patch
embedding. In fp32 and on GPUs the swapped layers run the same products as the reference up to
summation order; the reference model never imports this package.

The trainer, the sampler, the analysis and the benchmarks call `apply`; tests pick a code path
through its arguments. `reuse_weight_casts()` is the sampler's cast cache.
"""

from __future__ import annotations

import torch.nn as nn

from ..models.dit import DiTBlock, FinalLayer
from ..models.layers import Attention, PatchEmbed, SwiGLU
from ..models.moe import Dispatcher, Experts
from . import cpu_kernels
from .layers import FastAttention, FastDiTBlock, FastFinalLayer, FastPatchEmbed, FastSwiGLU
from .moe import EQUAL_GROUPS_MAX_PADDING, FastDispatcher, FastExperts
from .weight_casts import cast_weight, reuse_weight_casts

_SWAPS = {PatchEmbed: FastPatchEmbed, Attention: FastAttention, SwiGLU: FastSwiGLU, DiTBlock: FastDiTBlock,
          FinalLayer: FastFinalLayer, Experts: FastExperts}


def apply(model: nn.Module, *, fused: bool = True, grouped_mm: bool = True, row_bucket: int | None = None,
          max_padding: float | None = EQUAL_GROUPS_MAX_PADDING) -> nn.Module:
    """Install the speed layers in `model` (a DiT, a block, a MoE layer, ...), in place; returns it.

    fused: use the compiled one-pass CPU kernels where they apply (bf16 / fp16 on CPU); False
    keeps every other speed layer but runs the eager ops there.
    grouped_mm: the experts use `torch._grouped_mm` where it has a kernel; False: a loop.
    row_bucket: padding of expert groups (None: 64 rows on CPU in bf16 / fp16, else none; 0:
    never; n: always multiples of n). max_padding: largest fraction of extra rows taken to make
    all groups equal for batched products (None: never).
    Applying twice re-sets these options. Layers that are not of a reference class (already
    swapped, or replaced by `ditmoe.parallel`) keep their class; a dispatcher placed by
    expert parallelism never pads (`FastDispatcher.exact`).
    """
    for mod in model.modules():
        fast = _SWAPS.get(type(mod))
        if fast is not None:
            mod.__class__ = fast
        if isinstance(mod, (FastSwiGLU, FastDiTBlock, FastFinalLayer, FastExperts)):
            mod.fused = fused
        if isinstance(mod, Experts):
            mod.grouped_mm = grouped_mm
        if type(mod) is Dispatcher:
            mod.__class__ = FastDispatcher
            mod.exact = False
        if isinstance(mod, FastDispatcher):
            mod.row_bucket, mod.max_padding = row_bucket, max_padding
    return model


__all__ = ["apply", "cast_weight", "cpu_kernels", "reuse_weight_casts", "FastDispatcher", "FastExperts"]
