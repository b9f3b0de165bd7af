"""`ditmoe ref` and `ditmoe eval --ref FOLDER`: reference statistics of any image data, their cache,
and the refusal of statistics made with another extractor.

The MNIST-classifier extractor runs with an untrained stand-in classifier saved where the CLI
looks for it (DITMOE_CACHE), so nothing is trained or downloaded here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ditmoe.cli import main
from ditmoe.eval import reference
from ditmoe.eval.npz import load_reference_stats, save_samples_npz


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A cache folder holding a stand-in MNIST classifier (random weights, fixed seed)."""
    from safetensors.torch import save_file

    from ditmoe.eval.mnist_classifier import MNISTClassifier

    folder = tmp_path / "cache"
    folder.mkdir()
    torch.manual_seed(0)
    save_file(MNISTClassifier(width=8).state_dict(), str(folder / "mnist_classifier.safetensors"),
              metadata={"width": "8"})
    monkeypatch.setenv("DITMOE_CACHE", str(folder))
    return folder


def _digit_folder(root, n_per_class: int = 6, size: int = 32, classes=("a", "b")):
    """Class subfolders of grey PNGs: class a bright squares, class b dark ones, with noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 40, (size, size), dtype=np.uint8)
            img[8:24, 8:24] += np.uint8(200 if c == 0 else 100)
            Image.fromarray(img, mode="L").save(root / name / f"{i}.png")
    return root


def test_ref_from_folder_records_extractor(cache, tmp_path, capsys):
    data = _digit_folder(tmp_path / "data")
    out = tmp_path / "ref.npz"
    assert main(["ref", "--data", str(data), "--out", str(out)]) == 0  # auto: 1-channel 32 px -> mnist-cnn
    st = load_reference_stats(out)
    assert st["extractor"] == "mnist-cnn" and st["num_images"] == 12 and st["image_size"] == 32
    assert st["mu"].shape == (128,) and st["sigma"].shape == (128, 128) and st["features"].shape == (12, 128)
    assert len(st["extractor_digest"]) == 16 and "radii" in st
    # the statistics are those of the folder's images, computed directly
    from ditmoe.eval.mnist_classifier import MNISTClassifierExtractor

    ext = MNISTClassifierExtractor(cache / "mnist_classifier.safetensors")
    imgs = reference.load_reference_images(data)
    assert imgs.shape == (12, 32, 32, 1) and imgs.dtype == np.uint8
    feats = ext(imgs)["pool"]
    assert np.allclose(st["mu"], feats.mean(0), atol=1e-6)
    assert st["extractor_digest"] == reference.extractor_digest(ext)

    # --image-size and --max-images: a fixed subset, resized
    out2 = tmp_path / "ref28.npz"
    assert main(["ref", "--data", str(data), "--out", str(out2), "--image-size", "28", "--max-images", "5"]) == 0
    st2 = load_reference_stats(out2)
    assert st2["num_images"] == 5 and st2["image_size"] == 28


def test_ref_flat_folder_and_digits(cache, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    imgs = reference.load_reference_images(flat, image_size=16)
    assert imgs.shape == (4, 16, 16, 3)
    pytest.importorskip("sklearn")
    digits = reference.load_reference_images("digits", image_size=32)
    assert digits.shape == (297, 32, 32, 1)
    assert main(["ref", "--data", "digits", "--image-size", "32", "--max-images", "40",
                 "--out", str(tmp_path / "digits.npz")]) == 0
    assert load_reference_stats(tmp_path / "digits.npz")["num_images"] == 40


def test_eval_ref_folder_builds_once_then_reuses_cache(cache, tmp_path, capsys):
    data = _digit_folder(tmp_path / "data")
    samples = np.stack([np.asarray(Image.open(p)) for p in sorted((data / "a").glob("*.png"))])[..., None]
    save_samples_npz(tmp_path / "s.npz", samples)
    args = ["eval", "--samples", str(tmp_path / "s.npz"), "--ref", str(data)]
    before = reference.BUILDS
    assert main(args) == 0
    assert reference.BUILDS == before + 1 and "built reference statistics" in capsys.readouterr().out
    cached = list((cache / "references").glob("*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    assert main(args) == 0
    out = capsys.readouterr().out
    assert reference.BUILDS == before + 1 and "using cached reference statistics" in out
    assert cached[0].stat().st_mtime_ns == mtime
    # a changed file changes the key: rebuilt into a new cache entry
    img = data / "b" / "0.png"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert main(args) == 0
    assert reference.BUILDS == before + 2 and len(list((cache / "references").glob("*.npz"))) == 2


def test_eval_refuses_reference_of_another_extractor(cache, tmp_path, capsys):
    data = _digit_folder(tmp_path / "data")
    ref = tmp_path / "ref.npz"
    assert main(["ref", "--data", str(data), "--out", str(ref)]) == 0
    save_samples_npz(tmp_path / "s.npz", reference.load_reference_images(data)[:4])
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--ref", str(ref)]) == 0
    capsys.readouterr()
    # the same extractor name with other weights: a retrained classifier
    from safetensors.torch import save_file

    from ditmoe.eval.mnist_classifier import MNISTClassifier

    torch.manual_seed(1)
    save_file(MNISTClassifier(width=8).state_dict(), str(cache / "mnist_classifier.safetensors"),
              metadata={"width": "8"})
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "made with extractor 'mnist-cnn'" in err and "weights digest" in err and "ditmoe ref" in err
    # samples of another size than the reference images (any extractor but the MNIST one, 28 = 32 there)
    from ditmoe.eval.evaluate import check_reference_fits
    from ditmoe.eval.features import ModuleFeatureExtractor

    stand_in = ModuleFeatureExtractor(torch.nn.Flatten(), name="flat")
    stored = {"extractor": "flat", "extractor_digest": reference.extractor_digest(stand_in), "image_size": 32}
    check_reference_fits(ref, stored, stand_in, 32)
    with pytest.raises(ValueError, match="16x16"):
        check_reference_fits(ref, stored, stand_in, 16)


def test_ref_bad_inputs(cache, tmp_path, capsys):
    data = _digit_folder(tmp_path / "data", n_per_class=2)

    def run(*argv):
        rc = main(["ref", *map(str, argv)])
        return rc, capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run("--data", empty, "--out", tmp_path / "r.npz")
    assert rc == 2 and "is empty" in err
    (tmp_path / "noimg" / "c").mkdir(parents=True)
    (tmp_path / "noimg" / "c" / "notes.txt").write_text("x")
    rc, err = run("--data", tmp_path / "noimg", "--out", tmp_path / "r.npz")
    assert rc == 2 and "holds no images" in err
    rc, err = run("--data", tmp_path / "missing", "--out", tmp_path / "r.npz")
    assert rc == 2 and "does not exist" in err
    (data / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rc, err = run("--data", data, "--out", tmp_path / "r.npz")
    assert rc == 2 and "cannot be read" in err and "broken.png" in err
    (data / "a" / "broken.png").unlink()
    rc, err = run("--data", data, "--out", tmp_path)  # a folder
    assert rc == 2 and "is a folder" in err
    rc, err = run("--data", data, "--out", tmp_path / "r.txt")
    assert rc == 2 and "must end in .npz" in err
    (tmp_path / "afile").write_text("x")
    rc, err = run("--data", data, "--out", tmp_path / "afile" / "r.npz")  # its folder is a file
    assert rc == 2 and "afile" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        rc, err = run("--data", data, "--out", ro / "r.npz")
        assert rc == 2 and "cannot write" in err
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(data / "a" / "odd.png")
    rc, err = run("--data", data, "--out", tmp_path / "r.npz")
    assert rc == 2 and "--image-size" in err
    rc, err = run("--data", data, "--out", tmp_path / "r.npz", "--max-images", "1")
    assert rc == 2 and "--max-images" in err
    assert not (tmp_path / "r.npz").exists()
