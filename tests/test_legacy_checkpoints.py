"""Files written by an earlier ditmoe (tests/fixtures/legacy/README.md) still load and compute the same."""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ditmoe.config import TrainConfig
from ditmoe.convert import load_model
from ditmoe.generate import load_for_sampling
from ditmoe.train.loop import Trainer
from tolerances import TINY_DIT_CHAIN, assert_close_fp32

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def _legacy_io():
    return load_file(str(LEGACY / "legacy_io.safetensors"))


def test_legacy_ema_file_computes_what_it_computed():
    io = _legacy_io()
    model = load_model(LEGACY / "model_ema.safetensors").eval()
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"])
    # Same weights and inputs; only the CPU's summation order may differ: the tiny DiT's fp32 chain
    # (hidden 32 -> reductions of length 32 * 4 = 128 at most).
    assert_close_fp32(out, io["out_ema"], 128, TINY_DIT_CHAIN, "legacy model_ema.safetensors")


def test_legacy_training_checkpoint_samples_with_its_ema_weights():
    io = _legacy_io()
    loaded = load_for_sampling(LEGACY / "train_checkpoint.pt", "ema", None, "cpu")
    assert loaded.process == "flow" and loaded.weights == "ema"
    with torch.no_grad():
        out = loaded.model(io["x"], io["t"], io["y"])
    assert_close_fp32(out, io["out_ema"], 128, TINY_DIT_CHAIN, "legacy checkpoint, EMA weights")


def test_legacy_training_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(LEGACY / "train_checkpoint.pt", run / "checkpoints" / "step_0000002.pt")
    cfg = TrainConfig(model="debug", data="digits", out=str(run), steps=3, global_batch=8, lr=1e-3, ema_decay=0.5,
                      log_every=1, ckpt_every=1, keep_last=1, precision="fp32", progress=False, logger="csv",
                      resume="auto")
    overrides = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_experts=4, top_k=2)
    trainer = Trainer(cfg, overrides)
    assert trainer.step == 2
    saved = torch.load(run / "checkpoints" / "step_0000002.pt", weights_only=True)
    for name, value in trainer.model.state_dict().items():  # loaded as stored, bit for bit
        assert torch.equal(value, saved["model"][name]), name
    trainer.run()
    assert trainer.step == 3
