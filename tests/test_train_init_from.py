"""`ditmoe train --init-from`: a new run (step 0, fresh optimizer, EMA = the weights) from existing weights;
and the image-folder flags of `ditmoe train` (--allow-upscale, --grayscale, --verify-images) reaching the data."""

from __future__ import annotations

import io as bytes_io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditmoe import kernels
from ditmoe.cli import main
from ditmoe.config import TrainConfig
from ditmoe.convert import load_model, load_official, package_to_official, save_model, upcycle
from ditmoe.registry import create_model, get_config
from ditmoe.train.loop import Trainer

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(model="debug", data="digits", out=str(out), steps=2, global_batch=16, lr=1e-3, ema_decay=0.9,
                log_every=1, ckpt_every=0, keep_last=1, progress=False, precision="fp32", logger="csv")
    base.update(kw)
    return TrainConfig(**base)


def trainer(out: Path, overrides=None, **kw) -> Trainer:
    return Trainer(tiny_cfg(out, **kw), {"input_size": 8, **(overrides or {})})


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A finished two-step run of the tiny MoE on digits (checkpoint and model_ema.safetensors)."""
    out = tmp_path_factory.mktemp("src") / "run"
    tr = trainer(out)
    tr.run()
    return out


def io(in_channels: int = 1, size: int = 8, classes: int = 10):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, in_channels, size, size, generator=gen)
    t = torch.tensor([0.0, 17.0, 250.0, 500.0, 999.0, 731.0])
    y = torch.arange(6) % classes
    return x, t, y


def forward(model, inputs):
    with torch.no_grad():
        return model.eval()(*inputs)


def state_equal(a: dict, b: dict, skip=()) -> list[str]:
    """Keys (outside `skip`) whose tensors are not bit-identical."""
    return [k for k in a if k not in skip and not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("which", ["checkpoint", "model_ema.safetensors", "checkpoint-model-weights"])
def test_init_from_run_is_a_new_run_with_the_source_weights(source_run, tmp_path, which, capsys):
    ckpt = next((source_run / "checkpoints").glob("step_*.pt"))
    path = source_run / "model_ema.safetensors" if which == "model_ema.safetensors" else ckpt
    weights = "model" if which == "checkpoint-model-weights" else "ema"
    src = load_model(path, weights=weights)
    tr = trainer(tmp_path / "new", init_from=str(path), init_weights=weights)
    assert tr.step == 0 and len(tr.optimizer.state) == 0
    assert state_equal(tr.model.state_dict(), src.state_dict()) == []
    assert state_equal(tr.ema.model.state_dict(), src.state_dict()) == []  # EMA starts at the weights
    # Same weights, same code, same process: the forward is bit for bit the source's.
    inputs = io()
    assert torch.equal(forward(tr.model, inputs), forward(src, inputs))
    out = capsys.readouterr().out
    assert f"--init-from {path}" in out and "step 0" in out and "re-initialised" not in out
    if which == "checkpoint":
        raw = load_model(ckpt, weights="model")
        assert state_equal(raw.state_dict(), src.state_dict()) != []  # EMA and raw weights differ: the choice matters
    if which != "checkpoint-model-weights":
        return
    summary = tr.run()  # it trains from there, from step 0 to --steps
    assert summary["steps"] == 2 and sorted(p.name for p in (tmp_path / "new" / "checkpoints").iterdir()) == [
        "step_0000002.pt"]
    assert json.loads((tmp_path / "new" / "config.json").read_text())["train"]["init_from"] == str(path)


def make_folder(root: Path, classes: int, size: int, per_class: int = 4, mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return root


def test_other_class_count_reinitialises_the_label_embedding_only(source_run, tmp_path, capsys):
    folder = make_folder(tmp_path / "three", classes=3, size=8)
    ema = source_run / "model_ema.safetensors"
    tr = trainer(tmp_path / "new", data=str(folder), grayscale=True, flip=False, init_from=str(ema))
    fresh = trainer(tmp_path / "fresh", data=str(folder), grayscale=True, flip=False)  # same seed, no weights
    src = load_model(ema).state_dict()
    got = tr.model.state_dict()
    assert tr.model_cfg.num_classes == 3 and got["y_embedder.embedding_table.weight"].shape == (4, 64)
    assert state_equal(got, src, skip={"y_embedder.embedding_table.weight"}) == []
    assert torch.equal(got["y_embedder.embedding_table.weight"], fresh.model.state_dict()["y_embedder.embedding_table.weight"])
    assert tr.init_report.reinitialised == ["y_embedder.embedding_table.weight"]
    out = capsys.readouterr().out
    assert "y_embedder re-initialised: the weights embed 10 classes, this run's data has 3" in out
    assert tr.run()["steps"] == 2


def test_other_input_size_recomputes_the_position_table_only(source_run, tmp_path, capsys):
    ema = source_run / "model_ema.safetensors"
    tr = trainer(tmp_path / "new", overrides={"input_size": 16}, init_from=str(ema))  # digits at 16x16: 64 patches
    fresh = trainer(tmp_path / "fresh", overrides={"input_size": 16})
    src = load_model(ema).state_dict()
    got = tr.model.state_dict()
    assert got["pos_embed"].shape == (1, 64, 64) and src["pos_embed"].shape == (1, 16, 64)
    assert state_equal(got, src, skip={"pos_embed"}) == []
    assert torch.equal(got["pos_embed"], fresh.model.state_dict()["pos_embed"])
    assert tr.init_report.reinitialised == ["pos_embed"]
    assert "pos_embed recomputed for this run's 8x8 patch grid (the weights have 4x4)" in capsys.readouterr().out


def test_other_architecture_is_refused_naming_keys_and_the_fitting_flags(source_run, tmp_path):
    ema = source_run / "model_ema.safetensors"
    with pytest.raises(ValueError) as err:
        trainer(tmp_path / "wide", overrides={"hidden_size": 96}, init_from=str(ema))
    msg = str(err.value)
    assert "x_embedder.proj.weight: the weights have shape (64, 1, 2, 2), the run's model (96, 1, 2, 2)" in msg
    assert "--model debug" in msg and "--model-hidden-size 64" in msg
    assert not (tmp_path / "wide" / "checkpoints").exists() and not (tmp_path / "wide" / "config.json").exists()
    with pytest.raises(ValueError) as err:  # dense run, MoE weights: keys missing on both sides
        trainer(tmp_path / "dense", init_from=str(ema), model="debug-dense")
    msg = str(err.value)
    assert "in the weights but not in the run's model" in msg and "blocks.0.moe.experts.w_in" in msg
    assert "blocks.0.mlp.fc1.weight" in msg and "--model debug" in msg


def test_contradictory_or_destructive_init_is_refused_before_work(source_run, tmp_path):
    ema = source_run / "model_ema.safetensors"
    with pytest.raises(ValueError, match="init_from and resume contradict each other"):
        tiny_cfg(tmp_path / "x", init_from=str(ema), resume="auto").validate()
    with pytest.raises(ValueError, match="init_weights 'raw' is not 'ema' or 'model'"):
        tiny_cfg(tmp_path / "x", init_from=str(ema), init_weights="raw").validate()
    with pytest.raises(ValueError, match="already holds a training run"):  # an init-from run is a fresh run
        trainer(source_run, init_from=str(ema))
    with pytest.raises(ValueError, match="which --overwrite true deletes"):
        trainer(source_run, init_from=str(ema), overwrite=True)
    assert ema.is_file()
    with pytest.raises(ValueError, match="--init-weights model picks the raw weights of a training checkpoint"):
        trainer(tmp_path / "y", init_from=str(ema), init_weights="model")
    with pytest.raises(FileNotFoundError, match="--init-from .* does not exist"):
        trainer(tmp_path / "z", init_from=str(tmp_path / "missing.pt"))
    assert main(["train", "--model", "debug", "--data", "digits", "--out", str(tmp_path / "c"), "--init-from",
                 str(ema), "--resume", "auto"]) == 2


def test_official_layout_file_of_a_run_loads(source_run, tmp_path):
    src = load_model(source_run / "model_ema.safetensors")
    official = tmp_path / "official.pt"
    torch.save({"model": package_to_official(src.state_dict())}, official)  # per-expert Linear layout, no config
    tr = trainer(tmp_path / "new", init_from=str(official))
    assert "official" in tr.init_report.kind
    assert state_equal(tr.model.state_dict(), src.state_dict()) == []
    inputs = io()
    assert torch.equal(forward(tr.model, inputs), forward(src, inputs))


def latent_cache(path: Path, n: int = 16, channels: int = 4, size: int = 8, classes: int = 10) -> Path:
    """A latent cache written directly (no VAE): random moments, labels 0..classes-1."""
    from ditmoe.data.latents import FORMAT_NAME, FORMAT_VERSION, _create_safetensors

    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "class_names": json.dumps([str(c) for c in range(classes)]), "image_size": str(size * 8),
            "latent_size": str(size), "latent_channels": str(channels), "scaling_factor": "0.18215"}
    arrays = _create_safetensors(path, [("labels", np.int64, (n,)), ("mean", np.float32, (n, 2, channels, size, size)),
                                        ("logvar", np.float32, (n, 2, channels, size, size))], meta)
    rng = np.random.default_rng(0)
    arrays["labels"][:] = np.arange(n) % classes
    arrays["mean"][:] = rng.standard_normal(arrays["mean"].shape).astype(np.float32)
    arrays["logvar"][:] = -4.0
    for a in arrays.values():
        a.flush()
    return path


def test_released_official_checkpoint_loads_into_a_latent_run(tmp_path):
    """The official DiT-MoE fixture (4-channel latents, learned sigma) fine-tunes as a DDPM run on a latent cache."""
    cache = latent_cache(tmp_path / "latents.safetensors")
    fixture = FIXTURES / "official_tiny_moe.safetensors"
    tr = trainer(tmp_path / "new", data=str(cache), process="ddpm", init_from=str(fixture))
    ref = kernels.apply(load_official(fixture, num_heads=4))  # the trainer's code path: bit for bit
    assert state_equal(tr.model.state_dict(), ref.state_dict()) == []
    inputs = io(in_channels=4)
    assert torch.equal(forward(tr.model, inputs), forward(ref, inputs))
    # A flow run's model predicts no variance: the refusal names the output layer and the flag.
    with pytest.raises(ValueError) as err:
        trainer(tmp_path / "flow", data=str(cache), init_from=str(fixture))
    assert "final_layer.linear.weight: the weights have shape (32, 64), the run's model (16, 64)" in str(err.value)
    assert "--model-learn-sigma true" in str(err.value)
    with pytest.raises(ValueError, match="take 4-channel inputs and the data \\(1 channel"):
        trainer(tmp_path / "digits", process="ddpm", init_from=str(fixture))


def test_upcycled_dense_model_fine_tunes(tmp_path, capsys):
    dense_cfg = get_config("debug-dense").replace(in_channels=1, learn_sigma=False, timestep_scale=1000.0)
    torch.manual_seed(1)
    dense = create_model(dense_cfg)
    save_model(dense, tmp_path / "dense.safetensors")
    moe = upcycle(tmp_path / "dense.safetensors", num_experts=4, top_k=2)
    save_model(moe, tmp_path / "moe.safetensors")
    # --model debug has SwiGLU experts and a shared expert: refused, with the overrides that fit.
    with pytest.raises(ValueError) as err:
        trainer(tmp_path / "wrong", init_from=str(tmp_path / "moe.safetensors"))
    msg = str(err.value)
    flags = "--model-expert-type gelu --model-shared-hidden 0"
    assert flags in msg
    # The CLI run with those flags starts from the upcycled weights (norm_topk noted: it keeps the dense function).
    out = tmp_path / "cli"
    assert main(["train", "--model", "debug", "--model-input-size", "8", "--data", "digits", "--out", str(out),
                 "--init-from", str(tmp_path / "moe.safetensors"), *flags.split(), "--steps", "1",
                 "--global-batch", "8", "--logger", "csv", "--progress", "false", "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "--init-from" in text and "note: the weights were made with norm_topk=True" in text
    tr = trainer(tmp_path / "api", init_from=str(tmp_path / "moe.safetensors"),
                 overrides={"expert_type": "gelu", "shared_hidden": 0, "norm_topk": True})
    inputs = io()
    assert torch.equal(forward(tr.model, inputs), forward(moe, inputs))


# ------------------------------------------------------------------ image-folder flags of ditmoe train
def test_allow_upscale_and_grayscale_flags_reach_the_folder(tmp_path, capsys):
    folder = make_folder(tmp_path / "small", classes=2, size=6)  # 6x6 grayscale PNGs, model input 8
    args = ["train", "--model", "debug", "--model-input-size", "8", "--data", str(folder), "--steps", "1",
            "--global-batch", "4", "--logger", "csv", "--progress", "false", "--precision", "fp32"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "smaller than the model input 8x8" in err and "ditmoe train --allow-upscale true" in err
    assert main([*args, "--out", str(tmp_path / "ok"), "--allow-upscale", "true", "--grayscale", "true"]) == 0
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert saved["model"]["in_channels"] == 1 and saved["train"]["grayscale"] is True
    rgb = trainer(tmp_path / "rgb", data=str(folder), allow_upscale=True)  # the default reads RGB
    assert rgb.data_info.channels == 3 and rgb.model_cfg.in_channels == 3
    gray = trainer(tmp_path / "gray", data=str(folder), allow_upscale=True, grayscale=True)
    assert gray.data_info.channels == 1 and gray.dataset[0][0].shape == (1, 8, 8)


def test_verify_images_full_reports_a_truncated_jpeg_before_training(tmp_path, caplog):
    folder = make_folder(tmp_path / "f", classes=2, size=8)
    buf = bytes_io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = folder / "class_0" / "trunc.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # passes the fast (header) check
    with caplog.at_level(logging.WARNING, logger="ditmoe.data.folder"):
        fast = trainer(tmp_path / "fast", data=str(folder), grayscale=True)
    assert fast.data_info.extra["skipped"] == [] and "unreadable" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="ditmoe.data.folder"):
        full = trainer(tmp_path / "full", data=str(folder), grayscale=True, verify_images="full")
    assert full.data_info.extra["skipped"] == [str(bad)] and len(full.dataset) == len(fast.dataset) - 1
    assert "skipped 1 unreadable image file(s)" in caplog.text and "trunc.jpg" in caplog.text
    with pytest.raises(ValueError, match="verify_images 'all' is not 'fast', 'full' or 'none'"):
        tiny_cfg(tmp_path / "x", verify_images="all").validate()


def test_folder_flags_on_other_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--grayscale true applies to image folders, but --data digits is not a folder"):
        trainer(tmp_path / "d", grayscale=True)
    with pytest.raises(ValueError, match="--allow-upscale true, --verify-images full apply to image folders"):
        trainer(tmp_path / "d", allow_upscale=True, verify_images="full")
