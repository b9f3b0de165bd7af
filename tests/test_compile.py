"""torch.compile sees the whole bf16 model as one graph: no graph breaks, training or inference.

A break costs a compiled region per MoE layer (a Python call the compiler cannot trace, such as
ContextVar.get, turned the compiled S/2 training forward into 13 graphs once), so each CPU-only
fast path must step aside while compiling. In fp32 the compiler accepts no grouped GEMM, so the
experts run as a loop over host-read counts there: one break per MoE layer, by design.
"""

import contextlib

import pytest
import torch

from ditmoe import kernels
from ditmoe.registry import create_model


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_bf16_model_traces_without_graph_breaks(mode):
    torch._dynamo.reset()
    model = kernels.apply(create_model("debug"))  # the speed layers step aside while compiling
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.rand(2), torch.randint(0, cfg.num_classes, (2,))
    grad = torch.no_grad() if mode == "inference" else contextlib.nullcontext()
    model.train(mode == "train")
    with torch.autocast("cpu", torch.bfloat16), grad:
        if mode == "inference":
            from ditmoe.kernels import reuse_weight_casts

            with reuse_weight_casts():  # as the samplers run it
                explained = torch._dynamo.explain(model)(x, t, y)
        else:
            explained = torch._dynamo.explain(model)(x, t, y, return_aux=True)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
