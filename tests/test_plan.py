"""The planner: parameter counts, the activation estimate against measured saved tensors, the layouts' arithmetic, the CLI."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from ditmoe import kernels
from ditmoe.accounting import model_stats
from ditmoe.cli import main
from ditmoe.models.dit import DiT
from ditmoe.plan import PlanInput, activation_bytes, activation_bytes_per_token, param_counts, plan
from ditmoe.registry import get_config


@pytest.mark.parametrize("name", ["debug", "DiT-S/2", "DiT-MoE-S/2-8E2A", "DiT-MoE-XL/2-8E2A", "DiT-MoE-G/2-16E2A"])
def test_parameter_counts_agree_with_accounting(name):
    cfg = get_config(name)
    stats, counts = model_stats(cfg), param_counts(cfg)
    assert counts.total == stats.total_params
    assert counts.experts + counts.dense == counts.total
    # The inactive experts are exactly the routed-expert weights not chosen: E - k of every E.
    if cfg.num_experts:
        assert counts.total - counts.experts * (cfg.num_experts - cfg.top_k) // cfg.num_experts == stats.activated_params
    else:
        assert counts.experts == 0


def measured_saved_bytes(cfg, n: int, bf16: bool) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of a forward plus the loss.

    Parameters, and under autocast their low-precision copies (a weight's shape or its
    transpose), are weights rather than activations; the planner counts them separately.
    """
    torch.manual_seed(0)
    # The model as a GPU trains it: the speed layers without the two CPU-only bf16 measures, the
    # padding of expert groups to 64 rows (a kernel-cache measure: about 3% more rows at real
    # sizes, far more at these tiny ones) and the compiled CPU kernels (whose adaLN keeps fewer
    # tensors for backward).
    model = kernels.apply(DiT(cfg), fused=False, row_bucket=0)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        is_weight_copy = t.dtype in (torch.bfloat16, torch.float16) and tuple(t.shape) in param_shapes
        if storage.data_ptr() not in param_storages and not is_weight_copy:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    s = cfg.input_size
    x, t, y = torch.randn(n, cfg.in_channels, s, s), torch.rand(n) * 1000, torch.randint(0, cfg.num_classes, (n,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, t, y)
        (out[:, :cfg.in_channels].float() - x).pow(2).mean()
    return sum(saved.values())


SMALL = dict(hidden_size=128, depth=2, num_heads=4, num_experts=4, input_size=16, learn_sigma=False,
             class_dropout_prob=0.0)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", [
    {}, {"attn_layout": "fused_qknorm"}, {"expert_type": "gelu"}, {"num_experts": 0}, {"shared_hidden": 0},
    {"hidden_size": 256, "num_heads": 8, "num_experts": 8, "moe_placement": "every_other"},
], ids=["swiglu", "qknorm", "gelu-experts", "dense", "no-shared", "wide-every-other"])
def test_activation_estimate_matches_saved_tensors(variant, bf16):
    # The planner plans GPUs (see measured_saved_bytes).
    cfg = get_config("debug").replace(**SMALL).replace(**variant)
    n = 3  # 192 tokens: no activation shares a weight's shape
    measured = measured_saved_bytes(cfg, n, bf16)
    estimate = activation_bytes(cfg, n * cfg.num_patches, 2 if bf16 else 4)
    assert abs(estimate / measured - 1) < 0.25, (estimate, measured)
    assert abs(estimate / measured - 1) < 0.10  # tighter than required: flags a model change the formula misses


def test_checkpointing_keeps_block_inputs_plus_one_block():
    cfg = get_config("DiT-MoE-S/2-8E2A")
    per = activation_bytes_per_token(cfg, 2)
    full = activation_bytes(cfg, 1000, 2)
    ckpt = activation_bytes(cfg, 1000, 2, checkpointing=True)
    assert full == pytest.approx(1000 * (cfg.depth * (per["attention"] + per["moe"]) + per["outside"]))
    assert ckpt == pytest.approx(1000 * (cfg.depth * 4 * cfg.hidden_size + per["attention"] + per["moe"] + per["outside"]))
    assert ckpt < full / 5


def g_plan(**kw):
    base = dict(model=get_config("DiT-MoE-G/2-16E2A"), gpus=64, gpu_mem_gib=80, batch=1024, ep=8)
    base.update(kw)
    inp = PlanInput(**base)
    return inp, {p.layout: p for p in plan(inp)}


def test_layout_arithmetic_for_the_16b_model():
    inp, plans = g_plan()
    counts = param_counts(inp.model)
    gib = 2 ** 30
    state = lambda p: sum(p.memory.values())  # noqa: E731
    # 4 (fp32 master) + 4 (grads) + 8 (AdamW) + 4 (EMA) bytes per parameter a GPU holds.
    assert state(plans["ddp"]) == pytest.approx(20 * counts.total / gib)
    assert state(plans["fsdp"]) == pytest.approx(20 * counts.total / 64 / gib)
    assert state(plans["ep"]) == pytest.approx(20 * (counts.dense + counts.experts / 8) / gib)
    assert state(plans["ep_fsdp"]) == pytest.approx(20 * counts.total / 64 / gib)
    assert plans["ddp"].working == pytest.approx(2 * counts.total / gib)  # autocast's bf16 copies
    # Peak: the state plus the larger of (working copies + activations) and AdamW's temporaries.
    for p in plans.values():
        assert p.total == pytest.approx(state(p) + max(p.working + p.activations, p.step_temp))
    assert not plans["ddp"].fits and plans["fsdp"].fits and plans["ep_fsdp"].fits
    # All-to-all: 16 images x 256 tokens x top-2 rows of 1408 bf16 values, 7/8 leave the GPU,
    # dispatch + combine in forward and backward, 40 MoE layers.
    rows = 16 * 256 * 2
    assert plans["ep_fsdp"].all_to_all == pytest.approx(rows * 1408 * 2 * 7 / 8 * 4 * 40)
    assert plans["ddp"].all_to_all == plans["fsdp"].all_to_all == 0
    assert plans["ep_fsdp"].all_to_all_inter_node == 0  # ep 8 stays inside an 8-GPU node
    # Checkpointing recomputes the forward: two more exchanges.
    _, ckpt = g_plan(checkpointing=True)
    assert ckpt["ep_fsdp"].all_to_all == pytest.approx(plans["ep_fsdp"].all_to_all * 6 / 4)
    assert ckpt["ep_fsdp"].total < plans["ep_fsdp"].total


def test_layouts_that_do_not_apply_are_named():
    _, plans = g_plan(ep=3, gpus=48, batch=960)
    assert "ep 3 must divide the experts" in plans["ep"].feasible and not plans["ep"].fits
    _, dense = g_plan(model=get_config("DiT-XL/2"))
    assert dense["ep_fsdp"].feasible == "no experts to split"
    with pytest.raises(ValueError, match="does not split"):
        g_plan(gpus=6)


def test_plan_cli_prints_tables_and_json(capsys):
    args = ["plan", "--model", "DiT-MoE-G/2-16E2A", "--gpus", "64", "--gpu-mem", "80", "--batch", "1024", "--ep", "8"]
    assert main(args + ["--checkpointing"]) == 0
    text = capsys.readouterr().out
    assert "| **peak, checkpointed** |" in text and "EP + FSDP" in text and "--parallel ep_fsdp --ep-size 8" in text
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["total"] == model_stats(get_config("DiT-MoE-G/2-16E2A")).total_params
    assert [p["layout"] for p in data["layouts"]] == ["ddp", "fsdp", "ep", "ep_fsdp"]
    assert main(["plan", "--model", "DiT-MoE-G/2-16E2A", "--gpus", "6"]) == 2  # bad input: one clear line
    assert "does not split into 6 GPUs" in capsys.readouterr().err
