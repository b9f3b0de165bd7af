"""Live tracking while training: TensorBoard by default, preview grids, and neither disturbs training."""

import sys

import pytest
import torch

from ditmoe.cli import main
from ditmoe.config import TrainConfig
from ditmoe.train.checkpoint import list_checkpoints
from ditmoe.train.loop import Trainer
from ditmoe.train.previews import preview_labels
from ditmoe.train.progress import RunLogger


def tiny_trainer(out, **kw) -> Trainer:
    base = dict(model="debug", data="digits", out=str(out), steps=4, global_batch=16, lr=1e-3, ema_decay=0.9,
                log_every=1, ckpt_every=2, keep_last=4, progress=False, precision="fp32")
    base.update(kw)
    return Trainer(TrainConfig(**base), {"input_size": 8})


def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def preview_files(run):
    return sorted(p.name for p in (run / "previews").glob("*.png"))


def test_tensorboard_by_default_with_previews_and_resume_trimming(tmp_path):
    run = tmp_path / "run"
    assert TrainConfig().logger == "tensorboard" and TrainConfig().sample_every == 0
    tiny_trainer(run, sample_every=2).run()
    # A run stopped after its step-2 checkpoint: what it logged for steps 3-4 must not appear twice.
    (run / "checkpoints" / "step_0000004.pt").unlink()
    (run / "previews" / "step_0000004.png").unlink()
    (run / "previews" / "step_0000003.png").write_bytes(b"left by the stopped attempt")
    resumed = tiny_trainer(run, sample_every=2, resume="auto")
    assert resumed.step == 2
    summary = resumed.run()

    acc = events(run)
    tags = acc.Tags()
    for name in ("loss", "balance", "diffusion", "lr", "images_per_s", "expert_load_cv"):
        assert [e.step for e in acc.Scalars(f"train/{name}")] == [1, 2, 3, 4], name
    final = acc.Scalars("train/loss")[-1].value
    assert final == pytest.approx(summary["final"]["loss"], rel=1e-6)
    moe_layers = [i for i, _ in resumed.model.moe_layers()]
    assert sorted(tags["histograms"]) == [f"expert_load/layer_{i:02d}" for i in moe_layers]
    assert [e.step for e in acc.Images("expert_load/layers_x_experts")] == [1, 2, 3, 4]
    shot = acc.Images("previews/ema")
    assert [e.step for e in shot] == [2, 4]
    # One image per class (digits: 10), 8x8 each, padded by 2 in one row.
    assert (shot[0].width, shot[0].height) == (10 * 10 + 2, 12)
    assert preview_files(run) == ["step_0000002.png", "step_0000004.png"]
    assert summary["previews"]["count"] == 1  # this attempt wrote only step 4's


def test_previews_leave_training_untouched_and_resume_exact(tmp_path, monkeypatch):
    import random

    import numpy as np

    import ditmoe.generate

    real_generate, seen = ditmoe.generate.generate, []

    def generate_drawing_global_rng(model, *args, **kw):
        # A sampler or model that draws from the global streams (label dropout does in train mode)
        # must still leave training as it was.
        seen.append(model.training)
        torch.rand(3), np.random.rand(), random.random()
        return real_generate(model, *args, **kw)

    monkeypatch.setattr(ditmoe.generate, "generate", generate_drawing_global_rng)
    with_previews = tiny_trainer(tmp_path / "a", sample_every=1)
    with_previews.run()
    first = tiny_trainer(tmp_path / "b", sample_every=1, steps=2)
    first.run()
    resumed = tiny_trainer(tmp_path / "b", sample_every=1, steps=4, resume="auto")
    resumed.run()
    plain = tiny_trainer(tmp_path / "c", logger="csv")
    plain.run()
    assert preview_files(tmp_path / "a") == [f"step_{s:07d}.png" for s in (1, 2, 3, 4)]
    assert preview_files(tmp_path / "b") == preview_files(tmp_path / "a")
    assert (tmp_path / "a" / "previews" / "step_0000004.png").read_bytes() == \
        (tmp_path / "b" / "previews" / "step_0000004.png").read_bytes()
    assert not (tmp_path / "c" / "previews").exists() and not (tmp_path / "c" / "tensorboard").exists()
    assert (tmp_path / "c" / "metrics.csv").exists()
    for other in (resumed, plain):
        for (k, a), (_, b) in zip(with_previews.model.state_dict().items(), other.model.state_dict().items()):
            assert torch.equal(a, b), k
        for (k, a), (_, b) in zip(with_previews.ema.state_dict().items(), other.ema.state_dict().items()):
            assert torch.equal(a, b), k
    assert len(list_checkpoints(tmp_path / "b")) == 2
    assert seen == [False] * 8  # 4 + 2 + 2 previews, each from the EMA model in eval mode
    assert with_previews.ema.model.training is False


def test_preview_labels_one_per_class_up_to_16():
    assert preview_labels(10).tolist() == list(range(10))
    labels = preview_labels(1000)
    assert len(labels) == 16 and labels[0] == 0 and labels[-1] == 937 and len(set(labels.tolist())) == 16


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ValueError, match="pip install wandb"):
        TrainConfig(logger="wandb").validate()
    with pytest.raises(ValueError, match="pip install wandb"):
        RunLogger(tmp_path / "run", enabled=True, kind="tensorboard,wandb")
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert main(["train", "--model", "debug", "--data", "digits", "--out", str(tmp_path / "cli"),
                 "--logger", "wandb"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_unknown_logger_is_refused():
    with pytest.raises(ValueError, match="logger 'mlflow'"):
        TrainConfig(logger="mlflow").validate()
    with pytest.raises(ValueError, match="sample_every must be >= 0"):
        TrainConfig(sample_every=-1).validate()
