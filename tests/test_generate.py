"""The sample / analyze / eval commands end to end on a tiny trained model."""

import json

import numpy as np
import pytest
import torch

from ditmoe.cli import main
from ditmoe.generate import generate, image_noise, load_for_sampling
from tolerances import TINY_DIT_CHAIN, TINY_DIT_K, assert_close_fp32


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--model", "debug", "--model-input-size", "8", "--data", "digits", "--steps", "3",
                 "--global-batch", "8", "--out", str(out), "--progress", "false"]) == 0
    return out


def test_sample_writes_grid_npz_and_labels(tiny_run, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(tiny_run / "checkpoints" / "step_0000003.pt"), "--out", str(out),
                 "--classes", "2,7", "--per-class", "3", "--steps", "4", "--batch-size", "4", "--singles",
                 "--no-progress"]) == 0
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (6, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [2, 2, 2, 7, 7, 7]
    assert (out / "grid.png").exists() and len(list((out / "images").iterdir())) == 6
    cfg = json.loads((out / "sample_config.json").read_text())
    assert cfg["weights"] == "ema" and cfg["process"] == "flow"


def test_each_image_is_independent_of_batch_size(tiny_run):
    loaded = load_for_sampling(tiny_run / "model_ema.safetensors")
    assert loaded.process == "flow"  # read from the run's config.json
    assert loaded.weights == "ema"  # labelled in the file's metadata
    labels = torch.tensor([0, 1, 2, 3, 4])
    a = generate(loaded.model, loaded.process, labels, steps=3, cfg_scale=2.0, seed=5, batch_size=5, progress=False)
    b = generate(loaded.model, loaded.process, labels, steps=3, cfg_scale=2.0, seed=5, batch_size=2, progress=False)
    # Other batch sizes may block the fp32 products differently: three Euler steps of the "debug"
    # DiT (the fixtures' shape), each its fp32 chain, norm-relative (tolerances.py).
    assert_close_fp32(b, a, TINY_DIT_K, 3 * TINY_DIT_CHAIN, "batch 2 vs 5")
    # Image 3 drawn alone, as rank 1 of 2 would draw it, matches image 3 of the full run.
    c = generate(loaded.model, loaded.process, labels[3:4], steps=3, cfg_scale=2.0, seed=5, indices=[3], progress=False)
    assert_close_fp32(c[0], a[3], TINY_DIT_K, 3 * TINY_DIT_CHAIN, "image 3 alone")
    assert not torch.equal(image_noise([0], (1, 8, 8), 5, torch.device("cpu")),
                           image_noise([1], (1, 8, 8), 5, torch.device("cpu")))


def test_raw_weights_differ_from_ema(tiny_run):
    ema = load_for_sampling(tiny_run / "checkpoints" / "step_0000003.pt", weights="ema").model
    raw = load_for_sampling(tiny_run / "checkpoints" / "step_0000003.pt", weights="model").model
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()))


def test_analyze_writes_report_and_counts_every_routed_token(tiny_run, tmp_path):
    out = tmp_path / "a"
    assert main(["analyze", "--ckpt", str(tiny_run / "model_ema.safetensors"), "--out", str(out),
                 "--per-class", "1", "--steps", "3", "--cfg-scale", "2.0", "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert {"i", "ii", "iii"} <= set(stats["findings"])
    counts = np.load(out / "routing_counts.npz")
    # 10 images x 16 tokens x 3 steps, per branch, in each of the 2 MoE layers.
    assert counts["tokens"].tolist() == [[10 * 16 * 3] * 2] * 2
    assert (out / "report.md").read_text().count("holds") >= 1
    assert (out / "heatmap_position.png").exists()


def test_sample_rejects_out_of_range_class(tiny_run, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tiny_run / "model_ema.safetensors"), "--out", str(tmp_path),
                 "--classes", "12", "--no-progress"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_analyze_refuses_dense_model(tmp_path, capsys):
    from ditmoe import create_model
    from ditmoe.convert import save_model

    save_model(create_model("debug-dense"), tmp_path / "dense.safetensors")
    assert main(["analyze", "--ckpt", str(tmp_path / "dense.safetensors"), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 2
    assert "dense model" in capsys.readouterr().err


def test_sample_under_torchrun_equals_single_process(tiny_run, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["sample", "--ckpt", str(tiny_run / "model_ema.safetensors"), "--num-images", "7", "--steps", "3",
              "--batch-size", "3", "--seed", "11", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port), "-m", "ditmoe", *common, "--out", str(tmp_path / "dist")],
                   check=True, env=env, capture_output=True, timeout=240)
    assert main([*common, "--out", str(tmp_path / "single")]) == 0
    dist_npz, single_npz = np.load(tmp_path / "dist" / "samples.npz"), np.load(tmp_path / "single" / "samples.npz")
    assert dist_npz["arr_0"].shape == (7, 8, 8, 1)
    assert np.array_equal(dist_npz["arr_1"], single_npz["arr_1"])
    # Same per-image seeds, so the same images (up to float summation order across batch shapes).
    assert np.abs(dist_npz["arr_0"].astype(int) - single_npz["arr_0"].astype(int)).max() <= 1
    assert not list((tmp_path / "dist").glob("part_*.npz"))


@pytest.fixture(scope="module")
def run_with_sampling(tmp_path_factory):
    """A tiny run that records its sampling settings: heun, 2 steps, guidance 2.5."""
    out = tmp_path_factory.mktemp("run_sampling")
    assert main(["train", "--model", "debug", "--model-input-size", "8", "--data", "digits", "--steps", "2",
                 "--global-batch", "8", "--out", str(out), "--progress", "false", "--logger", "csv",
                 "--sampler", "heun", "--sample-steps", "2", "--cfg-scale", "2.5"]) == 0
    return out


def _sample_config(ckpt, out, *flags):
    assert main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--classes", "3", "--per-class", "1",
                 "--no-progress", *flags]) == 0
    cfg = json.loads((out / "sample_config.json").read_text())
    return cfg["sampler"], cfg["steps"], cfg["cfg_scale"]


@pytest.mark.parametrize("which", ["checkpoint", "ema", "ema_copied_elsewhere"])
def test_sample_uses_the_settings_the_run_recorded(run_with_sampling, tmp_path, which):
    import shutil

    ckpt = {"checkpoint": run_with_sampling / "checkpoints" / "step_0000002.pt",
            "ema": run_with_sampling / "model_ema.safetensors"}.get(which)
    if which == "ema_copied_elsewhere":  # the file itself carries them, without the run's config.json
        ckpt = tmp_path / "copy.safetensors"
        shutil.copy(run_with_sampling / "model_ema.safetensors", ckpt)
    assert _sample_config(ckpt, tmp_path / "a") == ("heun", 2, 2.5)
    # A flag wins over the recording; another sampler takes its own default steps, not the recorded ones.
    assert _sample_config(ckpt, tmp_path / "b", "--cfg-scale", "1.0") == ("heun", 2, 1.0)
    assert _sample_config(ckpt, tmp_path / "c", "--sampler", "euler", "--cfg-scale", "1.0") == ("euler", 50, 1.0)


def test_runs_without_recorded_settings_sample_with_the_defaults(tiny_run, tmp_path):
    import shutil

    from ditmoe.config import DEFAULT_CFG_SCALE
    from ditmoe.convert import load_model, save_model

    # tiny_run records the defaults (euler, 50 steps, 1.5); a file without any recording gets the same.
    plain = tmp_path / "plain.safetensors"
    save_model(load_model(tiny_run / "model_ema.safetensors"), plain)
    assert _sample_config(plain, tmp_path / "a", "--process", "flow", "--steps", "2") == ("euler", 2, DEFAULT_CFG_SCALE)


def test_recorded_sampler_must_fit_the_process():
    from ditmoe.config import TrainConfig

    with pytest.raises(ValueError, match="sampler ddim does not sample a flow model"):
        TrainConfig(process="flow", sampler="ddim").validate()
    with pytest.raises(ValueError, match="sample_steps"):
        TrainConfig(sample_steps=-1).validate()
