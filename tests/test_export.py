"""Model folders (save_pretrained / from_pretrained) and the dense DiT <-> diffusers export."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ditmoe
from ditmoe.cli import main
from ditmoe.convert import check_checkpoint_path
from ditmoe.registry import create_model, get_config
from tolerances import TINY_DIT_CHAIN, TINY_DIT_K, assert_close_fp32


def _random_model(name: str, seed: int = 0, **overrides):
    """A tiny model whose every trainable weight is random: the default init zeroes adaLN and the
    output layer, which would make any two models agree on a zero output."""
    torch.manual_seed(seed)
    model = create_model(get_config(name).replace(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


def _inputs(cfg, n: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([0.0, 417.0, 999.0])[:n]
    y = torch.tensor([1, cfg.num_classes, 7])[:n]  # the null label included
    return x, t, y


# ------------------------------------------------------------------------------- diffusers
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_diffusers_export_loads_and_computes_the_same(tmp_path, learn_sigma):
    from diffusers import DiTTransformer2DModel

    from ditmoe.export import exact_time_embedding, save_diffusers

    model = _random_model("debug-dense", learn_sigma=learn_sigma)
    save_diffusers(model, tmp_path / "dit", process="ddpm")
    assert json.loads((tmp_path / "dit" / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"
    loaded = exact_time_embedding(DiTTransformer2DModel.from_pretrained(str(tmp_path / "dit")).eval())
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        ours, theirs = model(x, t, y), loaded(x, t, y).sample
    assert theirs.shape == (3, model.config.out_channels, 8, 8)
    # Two fp32 evaluations of one function that may sum in different orders (diffusers' separate
    # q/k/v products against the fused qkv one): the tiny DiT's chain and longest reduction.
    assert_close_fp32(theirs, ours, TINY_DIT_K, TINY_DIT_CHAIN, "diffusers vs ditmoe")

    back = ditmoe.from_pretrained(tmp_path / "dit")  # recognised as a diffusers folder
    assert back.config == model.config  # ditmoe_config.json restores what diffusers' config cannot hold
    sd, back_sd = model.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys() and all(torch.equal(sd[k], back_sd[k]) for k in sd)


def test_stock_diffusers_differs_only_by_the_timestep_sinusoid(monkeypatch):
    """Loaded as is, diffusers embeds t with frequencies 10000^(-j/127): exactly this package's model
    with that sinusoid, and measurably different from ours (why exact_time_embedding exists)."""
    import ditmoe.models.layers as layers
    from ditmoe.export import to_diffusers

    model = _random_model("debug-dense", seed=3)
    stock = to_diffusers(model, exact_time=False)
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        ours, theirs = model(x, t, y), stock(x, t, y).sample
    assert ((theirs - ours).norm() / ours.norm()).item() > 1e-3

    def diffusers_sinusoid(t, dim, max_period=10000.0):  # downscale_freq_shift = 1, [cos | sin]
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    monkeypatch.setattr(layers, "timestep_embedding", diffusers_sinusoid)
    with torch.no_grad():
        ours_shifted = model(x, t, y)
    assert_close_fp32(theirs, ours_shifted, TINY_DIT_K, TINY_DIT_CHAIN, "stock diffusers vs shifted sinusoid")


def test_cli_diffusers_round_trip_and_moe_refusal(tmp_path, capsys):
    from ditmoe.convert import load_model, save_model

    dense = _random_model("debug-dense", seed=4)
    save_model(dense, tmp_path / "dense.safetensors", extra_meta={"process": "flow"})
    assert main(["convert", str(tmp_path / "dense.safetensors"), str(tmp_path / "hf"), "--to", "diffusers"]) == 0
    assert "exact_time_embedding" in capsys.readouterr().out
    # back: auto-detected, and with --from diffusers
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.safetensors")]) == 0
    assert main(["convert", "--from", "diffusers", str(tmp_path / "hf"), str(tmp_path / "back_dir"), "--to", "folder"]) == 0
    for back in (load_model(tmp_path / "back.safetensors"), ditmoe.from_pretrained(tmp_path / "back_dir")):
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in dense.state_dict().items())
    assert json.loads((tmp_path / "back_dir" / "config.json").read_text())["process"] == "flow"

    moe = _random_model("debug", seed=5)
    save_model(moe, tmp_path / "moe.safetensors")
    assert main(["convert", str(tmp_path / "moe.safetensors"), str(tmp_path / "moe_hf"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "DiT-MoE" in err and "--to folder" in err and "from_pretrained" in err
    assert not (tmp_path / "moe_hf").exists()  # refused before anything was written
    # --from diffusers on a folder that is not one
    assert main(["convert", "--from", "diffusers", str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err


def test_diffusers_refusals(tmp_path):
    from ditmoe.export import check_exportable, from_diffusers, to_diffusers

    with pytest.raises(ValueError, match="swiglu"):
        check_exportable(get_config("debug-dense").replace(dense_mlp_type="swiglu"))
    with pytest.raises(ValueError, match="fused_qknorm"):
        check_exportable(get_config("debug-dense").replace(attn_layout="fused_qknorm"))
    with pytest.raises(ValueError, match="DiT-MoE"):
        to_diffusers(_random_model("debug"))
    # blocks whose embedders were trained apart cannot become one shared embedder
    module = to_diffusers(_random_model("debug-dense"), exact_time=False)
    with torch.no_grad():
        module.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.add_(1.0)
    with pytest.raises(ValueError, match="block 1.*shared embedder"):
        from_diffusers(module)


# ----------------------------------------------------------------------------- model folders
def test_pretrained_round_trip_moe_bit_exact(tmp_path):
    from ditmoe.generate import load_for_sampling

    model = _random_model("debug", seed=6, top_k=1, shared_hidden=32)
    folder = ditmoe.save_pretrained(model, tmp_path / "moe", process="flow", weights="ema")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format"] == "ditmoe-pretrained" and cfg["format_version"] == 1 and cfg["num_experts"] == 4
    assert (folder / "model.safetensors").is_file()
    back = ditmoe.from_pretrained(folder)
    assert back.config == model.config
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        assert torch.equal(back(x, t, y), model(x, t, y))  # same weights, same code, same order: bit-exact
    loaded = load_for_sampling(folder)  # `ditmoe sample --ckpt FOLDER`
    assert loaded.process == "flow" and loaded.weights == "ema"
    assert check_checkpoint_path(folder) == folder


def test_cli_folder_conversion_and_sample(tmp_path):
    from ditmoe.convert import save_model

    model = _random_model("debug", seed=7, in_channels=1)  # pixel space: no VAE to decode with
    save_model(model, tmp_path / "m.safetensors", extra_meta={"process": "ddpm"})
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "f"), "--to", "folder"]) == 0
    assert main(["sample", "--ckpt", str(tmp_path / "f"), "--out", str(tmp_path / "s"), "--classes", "1",
                 "--per-class", "2", "--steps", "2", "--sampler", "ddim", "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "s" / "samples.npz").is_file()


def test_pretrained_folder_errors(tmp_path, capsys):
    model = _random_model("debug", seed=8)
    folder = ditmoe.save_pretrained(model, tmp_path / "f")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        ditmoe.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ditmoe.from_pretrained(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        ditmoe.from_pretrained(empty)
    # a plain folder given to sample still gets the listing of what it holds
    assert main(["sample", "--ckpt", str(empty), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "is a folder, not a checkpoint" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ditmoe.save_pretrained(model, tmp_path / "afile")
