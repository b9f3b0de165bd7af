"""Registry, config validation, model-zoo accounting and the meta-device G model."""

import subprocess
import sys
import time

import pytest
import torch

import ditmoe
from ditmoe.accounting import format_count, model_stats
from ditmoe.registry import get_config, model_names

# Paper Table 1 (see docs): name -> (total, activated, GFLOPs) as printed.
PAPER_TABLE = {
    "DiT-MoE-S/2-8E2A": ("199.3M", "71.9M", "15.43"),
    "DiT-MoE-S/2-16E2A": ("369.2M", "71.9M", "15.44"),
    "DiT-MoE-B/2-8E2A": ("795.9M", "286.3M", "61.68"),
    "DiT-MoE-L/2-8E2A": ("2.82B", "1.01B", "219.26"),
    "DiT-MoE-XL/2-8E2A": ("4.17B", "1.49B", "323.74"),
    "DiT-MoE-G/2-16E2A": ("16.50B", "3.18B", "690.94"),
}


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_model_zoo_matches_paper_table(name):
    s = model_stats(get_config(name))
    assert (format_count(s.total_params), format_count(s.activated_params), f"{s.gmacs:.2f}") == PAPER_TABLE[name]


def test_dense_xl_matches_dit_paper_with_attention_flops():
    s = model_stats(get_config("DiT-XL/2"))
    assert format_count(s.total_params) == "675.1M"
    assert f"{s.gmacs_with_attention:.1f}" == "118.6"  # DiT counts QK^T and AV too


def test_registry_has_every_family_member():
    names = set(model_names())
    for size in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            assert f"DiT-{size}/{p}" in names
            for e in ("8E2A", "16E2A"):
                assert f"DiT-MoE-{size}/{p}-{e}" in names
    assert "DiT-MoE-G/2-16E2A" in names and "debug" in names


def test_g_model_on_meta_device_is_fast_and_allocates_nothing():
    start = time.perf_counter()
    model = ditmoe.create_model("DiT-MoE-G/2-16E2A", device="meta")
    assert time.perf_counter() - start < 20
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert format_count(sum(p.numel() for p in params)) == "16.50B"


def test_overrides_reach_the_model():
    m = ditmoe.create_model(
        "debug", input_size=16, in_channels=1, num_classes=7, learn_sigma=False, class_dropout_prob=0.0,
        num_experts=6, top_k=3, norm_topk=True, shared_hidden=0, expert_hidden=40, expert_type="gelu",
        aux_alpha=0.005, attn_layout="fused_qknorm", moe_placement="deep_half", depth=4)
    assert m.x_embedder.proj.weight.shape == (64, 1, 2, 2)
    assert m.y_embedder.embedding_table.weight.shape == (8, 64)
    assert [b.is_moe for b in m.blocks] == [False, False, True, True]
    moe = m.blocks[3].moe
    assert moe.num_experts == 6 and moe.top_k == 3 and moe.gate.norm_topk and moe.shared_experts is None
    assert moe.experts.w_in.shape == (6, 64, 40) and moe.experts.b_in is not None
    assert moe.gate.aux_alpha == 0.005 and hasattr(m.blocks[0].attn, "q_norm")
    out = m(torch.randn(2, 1, 16, 16), torch.tensor([3, 4]), torch.tensor([0, 7]))
    assert out.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("placement,expected", [
    ("all", [True] * 4), ("every_other", [False, True, False, True]),
    ("deep_half", [False, False, True, True]), ("shallow_half", [True, True, False, False]),
])
def test_moe_placement(placement, expected):
    assert get_config("debug", depth=4, moe_placement=placement).moe_blocks() == expected


@pytest.mark.parametrize("overrides,message", [
    (dict(top_k=5), "top_k 5 must be between 1 and num_experts 4"),
    (dict(num_heads=5), "not divisible by num_heads"),
    (dict(input_size=9), "input_size 9 is not divisible by patch_size 2"),
    (dict(expert_type="relu"), "expert_type"),
    (dict(no_such_option=1), "unknown model override"),
])
def test_invalid_configs_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        ditmoe.create_model("debug", **overrides)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as e:
        ditmoe.create_model("DiT-MoE-Q/2-8E2A")
    assert "DiT-MoE-S/2-8E2A" in str(e.value) and "debug" in str(e.value)


def test_import_is_cheap():
    code = "import sys, ditmoe; print(any(m in sys.modules for m in ('torch', 'diffusers', 'matplotlib', 'scipy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_info_cli_prints_paper_numbers(capsys):
    from ditmoe.cli import main

    assert main(["info", "DiT-MoE-XL/2-8E2A"]) == 0
    out = capsys.readouterr().out
    assert "4.17B" in out and "1.49B" in out and "323.74" in out
