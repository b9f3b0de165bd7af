"""`ditmoe sample / analyze / eval / convert` given what a careless or hostile user gives them:
each bad input gets one clear error that names the problem and the fix before any work starts,
and no earlier output is lost."""

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch

import ditmoe
from ditmoe.cli import main
from ditmoe.convert import atomic_write, load_model_and_info, read_state_dict, save_model
from ditmoe.generate import load_for_sampling


def _run(capsys, *argv):
    """Run the CLI in-process: (return code, stderr)."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step flow run of the tiny debug model: a training checkpoint and model_ema.safetensors."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--model", "debug", "--model-input-size", "8", "--data", "digits", "--steps", "2",
                 "--global-batch", "8", "--out", str(out), "--progress", "false"]) == 0
    ckpt = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    return out, ckpt


@pytest.fixture(scope="module")
def ema_file(tiny_run):
    return tiny_run[0] / "model_ema.safetensors"


@pytest.fixture
def earlier(tmp_path):
    """An output folder holding the results of an earlier run, which a failing command must keep."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"earlier samples")
    (out / "grid.png").write_bytes(b"earlier grid")
    return out


def _kept(folder):
    return (folder / "samples.npz").read_bytes() == b"earlier samples" and \
        (folder / "grid.png").read_bytes() == b"earlier grid" and not list(folder.glob(".*tmp*"))


# --------------------------------------------------------------------------- convert
def test_convert_training_checkpoint_keeps_its_config_and_process(tiny_run, tmp_path, capsys):
    run, ckpt = tiny_run
    dst = tmp_path / "converted.safetensors"
    rc, err = _run(capsys, "convert", ckpt, dst)
    assert rc == 0, err
    stored = ditmoe.ModelConfig.from_json(torch.load(ckpt, weights_only=True)["model_config"])
    written = json.loads(dst.with_suffix(".json").read_text())
    assert written == stored.to_dict()  # name, num_heads, timestep_scale 1000, ... as trained
    assert written["timestep_scale"] == 1000.0 and written["name"] == "debug"
    # The output computes what the checkpoint's EMA model computes.
    ema = load_for_sampling(ckpt, "ema").model
    conv = load_for_sampling(dst)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 10])
    with torch.no_grad():
        assert torch.equal(conv.model(x, t, y), ema(x, t, y))
    # Far from its run folder, the converted file still samples as the flow model it is.
    assert conv.process == "flow" and conv.weights == "ema"
    out = tmp_path / "s"
    rc, err = _run(capsys, "sample", "--ckpt", dst, "--out", out, "--classes", "3", "--per-class", "1",
                   "--steps", "2", "--no-progress")
    assert rc == 0, err
    cfg = json.loads((out / "sample_config.json").read_text())
    assert cfg["process"] == "flow" and cfg["sampler"] == "euler" and cfg["steps"] == 2


def test_convert_to_official_and_back_keeps_time_convention_and_process(tiny_run, tmp_path, capsys):
    _, ckpt = tiny_run
    off = tmp_path / "official.safetensors"
    assert _run(capsys, "convert", ckpt, off, "--to", "official")[0] == 0
    model, info = load_model_and_info(off)
    assert model.config.timestep_scale == 1000.0 and info["process"] == "flow"


def test_convert_training_checkpoint_refuses_contradicting_options(tiny_run, tmp_path, capsys):
    _, ckpt = tiny_run
    rc, err = _run(capsys, "convert", ckpt, tmp_path / "x.safetensors", "--timestep-scale", "1")
    assert rc == 2 and "training checkpoint" in err and "timestep_scale=1000.0" in err and "drop it" in err
    rc, err = _run(capsys, "convert", ckpt, tmp_path / "x.safetensors", "--model", "debug")
    assert rc == 2 and "records its model config" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("case", ["folder", "not_safetensors", "parent_is_file"])
def test_convert_checks_dst_before_reading(ema_file, tmp_path, capsys, case):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "model.json").write_text("weights of another model")
    dst = {"folder": keep, "not_safetensors": keep / "model.json",
           "parent_is_file": keep / "model.json" / "x.safetensors"}[case]
    rc, err = _run(capsys, "convert", ema_file, dst)
    assert rc == 2 and "DST" in err
    assert {"folder": "is a folder", "not_safetensors": "must end in .safetensors",
            "parent_is_file": "is a file"}[case] in err
    assert (keep / "model.json").read_text() == "weights of another model"


# -------------------------------------------------------------------- unreadable inputs
@pytest.mark.parametrize("content", [b"", b"\x00" * 7, np.random.default_rng(0).bytes(300), "truncated"])
@pytest.mark.parametrize("command", ["sample", "convert"])
def test_unreadable_safetensors(ema_file, tmp_path, capsys, content, command):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ema_file.read_bytes()[:5000] if content == "truncated" else content)
    argv = (["sample", "--ckpt", bad, "--out", tmp_path / "s", "--no-progress"] if command == "sample"
            else ["convert", bad, tmp_path / "c.safetensors"])
    rc, err = _run(capsys, *argv)
    assert rc == 2
    assert "not a readable safetensors file" in err and "truncated" in err and "model_ema.safetensors" in err
    assert "Traceback" not in err and not (tmp_path / "s").exists() and not (tmp_path / "c.safetensors").exists()


def test_safetensors_that_is_not_a_model(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(2, 4)}, tmp_path / "latents.safetensors")
    rc, err = _run(capsys, "sample", "--ckpt", tmp_path / "latents.safetensors", "--out", tmp_path / "s", "--no-progress")
    assert rc == 2 and "not a DiT / DiT-MoE model" in err and "latents.safetensors" in err


def test_folder_as_ckpt_lists_what_to_pass(tiny_run, tmp_path, capsys):
    run, ckpt = tiny_run
    rc, err = _run(capsys, "sample", "--ckpt", run, "--out", tmp_path / "s", "--no-progress")
    assert rc == 2 and "is a folder" in err
    assert str(run / "model_ema.safetensors") in err and str(ckpt) in err
    rc, err = _run(capsys, "convert", run, tmp_path / "c.safetensors")
    assert rc == 2 and "is a folder" in err and "state dict" not in err


def test_unsafe_pickle_is_named_as_such(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    rc, err = _run(capsys, "convert", tmp_path / "evil.pt", tmp_path / "c.safetensors")
    assert rc == 2 and "executed" not in capsys.readouterr().out
    assert "holds Python objects other than tensors" in err and "weights-only" in err
    assert "torch.save(model.state_dict()" in err
    assert "weights_only=False" not in err and "truncated" not in err


@pytest.mark.parametrize("content", [b"", "truncated", *(np.random.default_rng(s).bytes(200) for s in range(4))])
def test_corrupt_torch_checkpoint_is_named_as_such(tiny_run, tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tiny_run[1].read_bytes()[:4096] if content == "truncated" else content)
    rc, err = _run(capsys, "sample", "--ckpt", bad, "--out", tmp_path / "s", "--no-progress")
    assert rc == 2 and "not a readable torch checkpoint" in err and "truncated" in err
    assert "Python objects" not in err and "weights_only=False" not in err


# ------------------------------------------------------------------------- sample args
@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--per-class", "0"], "--per-class must be at least 1"),
    (["--per-class", "-3"], "--per-class must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--classes", ""], "names no class"),
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--num-images", "-5"], "--num-images must be at least 1"),
    (["--classes", "3,10"], "out of range"),
    (["--classes", "-1"], "out of range"),
    (["--cfg-scale", "-3"], "1 = no guidance"),
    (["--max-grid", "-1"], "--max-grid must be >= 0"),
    (["--sampler", "ddpm"], "does not sample a flow model"),
    (["--cfg-channels", "7"], "--cfg-channels"),
])
def test_sample_refuses_bad_numbers(ema_file, earlier, capsys, args, message):
    rc, err = _run(capsys, "sample", "--ckpt", ema_file, "--out", earlier, "--no-progress", *args)
    assert rc == 2 and message in err
    assert _kept(earlier) and sorted(p.name for p in earlier.iterdir()) == ["grid.png", "samples.npz"]


@pytest.mark.parametrize("args, message", [
    (["--per-class", "0"], "--per-class must be at least 1"),
    (["--permutations", "0"], "--permutations must be at least 1"),
    (["--permutations", "-2"], "--permutations must be at least 1"),
    (["--steps", "-1"], "--steps must be at least 1"),
])
def test_analyze_refuses_bad_numbers(ema_file, tmp_path, capsys, args, message):
    rc, err = _run(capsys, "analyze", "--ckpt", ema_file, "--out", tmp_path / "a", "--no-progress", *args)
    assert rc == 2 and message in err and not (tmp_path / "a").exists()


def test_max_grid_zero_writes_no_grid(ema_file, tmp_path, capsys):
    rc, err = _run(capsys, "sample", "--ckpt", ema_file, "--out", tmp_path / "s", "--classes", "1", "--per-class", "1",
                   "--steps", "1", "--max-grid", "0", "--no-progress")
    assert rc == 0, err
    assert (tmp_path / "s" / "samples.npz").exists() and not (tmp_path / "s" / "grid.png").exists()


def test_device_without_cuda(ema_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = _run(capsys, "sample", "--ckpt", ema_file, "--out", tmp_path / "s", "--device", "cuda", "--no-progress")
    assert rc == 2 and "no CUDA GPU" in err and "--device cpu" in err
    rc, err = _run(capsys, "sample", "--ckpt", ema_file, "--out", tmp_path / "s", "--device", "gpu7", "--no-progress")
    assert rc == 2 and "not a device name" in err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------- output folders
@pytest.mark.parametrize("command", ["sample", "analyze"])
def test_out_that_is_a_file(ema_file, tmp_path, capsys, command):
    target = tmp_path / "results.txt"
    target.write_text("notes")
    for out in (target, target / "sub"):
        rc, err = _run(capsys, command, "--ckpt", ema_file, "--out", out, "--no-progress")
        assert rc == 2 and "is a file" in err and str(target) in err
    assert target.read_text() == "notes"


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nobody may write in (root ignores the mode bits, so the write is refused by hand too)."""
    import tempfile

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and os.path.realpath(dir).startswith(os.path.realpath(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["sample", "analyze", "eval", "convert"])
def test_read_only_output_is_found_before_any_work(ema_file, read_only, tmp_path, capsys, monkeypatch, command):
    import ditmoe.generate

    def no_work(*a, **kw):
        raise AssertionError("the command started work before checking its output")

    monkeypatch.setattr(ditmoe.generate, "load_for_sampling", no_work)
    monkeypatch.setattr(ditmoe.generate, "generate", no_work)
    monkeypatch.setattr(ditmoe.convert, "load_model_and_info", no_work)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    argv = {"sample": ["sample", "--ckpt", ema_file, "--out", read_only / "s", "--no-progress"],
            "analyze": ["analyze", "--ckpt", ema_file, "--out", read_only, "--no-progress"],
            "eval": ["eval", "--samples", samples, "--ref", samples, "--out", read_only / "eval.json"],
            "convert": ["convert", ema_file, read_only / "c.safetensors"]}[command]
    rc, err = _run(capsys, *argv)
    assert rc == 2 and "cannot write there" in err and "writable folder" in err and str(read_only) in err
    assert list(read_only.iterdir()) == []


# --------------------------------------------------------------------- disk write errors
def test_disk_full_while_writing_samples(ema_file, earlier, capsys, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    rc, err = _run(capsys, "sample", "--ckpt", ema_file, "--out", earlier, "--classes", "1", "--per-class", "1",
                   "--steps", "1", "--no-progress")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert rc == 1 and "no space left" in err and "free space" in err and "Traceback" not in err
    assert (earlier / "samples.npz").read_bytes() == b"earlier samples"  # the old file survives the failed write
    assert not list(earlier.glob(".*tmp*"))


def test_disk_full_names_the_path(ema_file, tmp_path, capsys, monkeypatch):
    import ditmoe.convert

    def full(model, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ditmoe.convert, "save_model", full)
    rc, err = _run(capsys, "convert", ema_file, tmp_path / "c.safetensors")
    assert rc == 1 and str(tmp_path / "c.safetensors") in err and "free space" in err


def test_read_only_error_during_work_says_choose_a_writable_folder(ema_file, tmp_path, capsys, monkeypatch):
    import ditmoe.convert

    def denied(model, path, **kw):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(ditmoe.convert, "save_model", denied)
    rc, err = _run(capsys, "convert", ema_file, tmp_path / "c.safetensors")
    assert rc == 1 and "writable folder" in err and str(tmp_path / "c.safetensors") in err


def test_torch_save_failure_reads_as_disk_write_failure(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous checkpoint")

    def failing_save(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")

    with pytest.raises(OSError) as info:
        atomic_write(path, failing_save)
    assert info.value.filename == str(path) and "could not write" in str(info.value)
    assert path.read_bytes() == b"previous checkpoint" and not list(tmp_path.glob(".*tmp*"))
    # Raised from inside a command, the CLI reports it as a write failure, not a traceback.
    import ditmoe.convert

    def save_model_fails(model, path, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ditmoe.convert, "save_model", save_model_fails)
    src = tmp_path / "m.safetensors"
    save_model(ditmoe.create_model("debug", input_size=8), src)
    rc, err = _run(capsys, "convert", src, tmp_path / "c.safetensors")
    assert rc == 1 and "could not write" in err and "Traceback" not in err


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").close())
        with open(tmp_path / "plain.bin", "wb"):
            pass
        assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "b.bin", lambda tmp: open(tmp, "wb").close())
        assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o600
        (tmp_path / "a.bin").chmod(0o640)  # an existing file keeps its mode, as open() keeps it
        atomic_write(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").close())
        assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_run_outputs_are_world_readable(tiny_run, tmp_path, capsys):
    run, ckpt = tiny_run
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    assert _run(capsys, "sample", "--ckpt", ckpt, "--out", tmp_path / "s", "--classes", "1", "--per-class", "1",
                "--steps", "1", "--no-progress")[0] == 0
    for f in (tmp_path / "s" / "samples.npz", run / "model_ema.safetensors", ckpt):
        assert stat.S_IMODE(f.stat().st_mode) == want, f


# ------------------------------------------------------------------------------- eval
def _npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize("kind, message", [
    ("int64", "has dtype int64"),
    ("uint16", "has dtype uint16"),
    ("float_nhwc", "look like (N, H, W, C)"),
    ("float_0_255", "read as [-1, 1]"),
    ("no_arr_0", "no 'arr_0'"),
    ("garbage", "not a readable .npz"),
    ("empty_file", "it is empty"),
    ("folder", "is a folder"),
    ("zero_images", "holds no images"),
    ("labels_out_of_range", "outside the MNIST classes 0..9"),
    ("labels_count", "3 labels for 4 images"),
    ("npy", "single .npy array"),
    ("missing", "does not exist"),
])
def test_eval_refuses_bad_samples(tmp_path, capsys, monkeypatch, kind, message):
    from ditmoe.eval import mnist_classifier

    def no_classifier(*a, **kw):
        raise AssertionError("the classifier was trained before the samples were checked")

    monkeypatch.setattr(mnist_classifier, "ensure_mnist_classifier", no_classifier)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 28, 28, 1))
    path = tmp_path / "samples.npz"
    if kind == "int64":
        _npz(path, arr_0=grey.astype(np.int64))
    elif kind == "uint16":
        _npz(path, arr_0=(grey * 200).astype(np.uint16))
    elif kind == "float_nhwc":
        _npz(path, arr_0=rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32))
    elif kind == "float_0_255":
        _npz(path, arr_0=grey.transpose(0, 3, 1, 2).astype(np.float32))
    elif kind == "no_arr_0":
        _npz(path, images=grey.astype(np.uint8))
    elif kind == "garbage":
        path.write_bytes(rng.bytes(400))
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    elif kind == "zero_images":
        _npz(path, arr_0=np.zeros((0, 28, 28, 1), np.uint8))
    elif kind == "labels_out_of_range":
        _npz(path, arr_0=grey.astype(np.uint8), arr_1=np.array([0, 3, 12, 1]))
    elif kind == "labels_count":
        _npz(path, arr_0=grey.astype(np.uint8), arr_1=np.array([0, 3, 1]))
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, grey.astype(np.uint8))
    ref = _npz(tmp_path / "ref.npz", arr_0=grey.astype(np.uint8))
    out = tmp_path / "eval.json"
    out.write_text("earlier results")
    rc, err = _run(capsys, "eval", "--samples", path, "--ref", ref, "--out", out)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and out.read_text() == "earlier results"


def test_eval_refuses_bad_reference_and_out(tmp_path, capsys):
    samples = _npz(tmp_path / "s.npz", arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    (tmp_path / "garbage.npz").write_bytes(np.random.default_rng(1).bytes(300))
    rc, err = _run(capsys, "eval", "--samples", samples, "--ref", tmp_path / "garbage.npz")
    assert rc == 2 and "--ref" in err and "not a readable .npz" in err
    stats_only = _npz(tmp_path / "odd.npz", something=np.zeros(3))
    rc, err = _run(capsys, "eval", "--samples", samples, "--ref", stats_only)
    assert rc == 2 and "neither statistics" in err
    rc, err = _run(capsys, "eval", "--samples", samples, "--ref", samples, "--out", tmp_path)
    assert rc == 2 and "--out" in err and "is a folder" in err


def test_evaluate_refuses_labels_the_classifier_cannot_predict():
    from ditmoe.eval import evaluate
    from ditmoe.eval.mnist_classifier import MNISTClassifier, MNISTClassifierExtractor

    class Counting(MNISTClassifierExtractor):
        calls = 0

        def __call__(self, *a, **kw):
            Counting.calls += 1
            return super().__call__(*a, **kw)

    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    ext = Counting(MNISTClassifier())
    with pytest.raises(ValueError, match="outside the classifier's classes 0..9"):
        evaluate(images, images, extractor=ext, labels=np.array([0, 1, 2, 3, 4, 10]))
    assert Counting.calls == 0
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(images[:1], images, extractor=ext)


def test_read_state_dict_messages_for_the_api(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="is a folder"):
        read_state_dict(tmp_path)


def test_upcycle_of_a_dense_training_checkpoint_keeps_config_and_process(tmp_path, capsys):
    dense = ditmoe.create_model("debug-dense", input_size=8, timestep_scale=1000.0)  # flow runs' time convention
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    ckpt = tmp_path / "step_0000001.pt"
    torch.save({"format": "ditmoe-train", "model": sd, "ema": sd, "model_config": dense.config.to_json(),
                "train_config": json.dumps({"process": "flow"})}, ckpt)
    rc, err = _run(capsys, "upcycle", ckpt, tmp_path / "moe.safetensors", "--experts", "2", "--top-k", "1")
    assert rc == 0, err
    loaded = load_for_sampling(tmp_path / "moe.safetensors")
    assert loaded.process == "flow" and loaded.model.config.timestep_scale == 1000.0
    assert loaded.model.config.name.startswith("debug-dense-upcycled")
    assert loaded.model.config.num_experts == 2
    rc, err = _run(capsys, "upcycle", ckpt, tmp_path / "moe2.safetensors", "--experts", "2", "--top-k", "3")
    assert rc == 2 and "--top-k" in err and not (tmp_path / "moe2.safetensors").exists()


def test_ditmoe_debug_shows_the_traceback(ema_file, tmp_path, monkeypatch):
    import ditmoe.convert

    def full(model, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ditmoe.convert, "save_model", full)
    monkeypatch.setenv("DITMOE_DEBUG", "1")
    with pytest.raises(OSError, match="No space left"):
        main(["convert", str(ema_file), str(tmp_path / "c.safetensors")])
