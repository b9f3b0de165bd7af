"""Tests for ditmoe.eval: metrics against closed forms, brute force and torchmetrics; extractors; npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ditmoe.eval import (
    ModuleFeatureExtractor,
    compute_reference_stats,
    evaluate,
    feature_statistics,
    fid_from_features,
    format_results,
    frechet_distance,
    get_extractor,
    inception_score,
    load_reference_stats,
    load_samples_npz,
    manifold_radii,
    precision_recall,
    save_reference_stats,
    save_samples_npz,
    to_uint8_nhwc,
)
from ditmoe.eval import metrics as metrics_mod
from ditmoe.eval.inception import (
    INCEPTION_WEIGHTS_FILE,
    InceptionV3Extractor,
    import_torch_fidelity_inception,
    resolve_inception_weights,
)
from ditmoe.eval.mnist_classifier import (
    MNISTClassifier,
    MNISTClassifierExtractor,
    load_mnist,
    load_mnist_classifier,
    mnist_to_input,
    train_mnist_classifier,
)
from tolerances import EPS32


class TinyConvNet(nn.Module):
    """A random conv net standing in for Inception: uint8 (N, 3, H, W) -> (N, 16)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * self.net(x.float() / 127.5 - 1.0)


def smooth_images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """Random blurry colour images, uint8 (N, H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- FID

def test_fid_matches_torchmetrics():
    try:  # torchmetrics imports torch-fidelity when installed, which needs this without torchvision
        import_torch_fidelity_inception()
    except ModuleNotFoundError:
        pass
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    net = TinyConvNet().eval()
    a = smooth_images(300, seed=1)
    b = np.clip(smooth_images(300, seed=2).astype(np.int16) + 30, 0, 255).astype(np.uint8)

    ours_ext = ModuleFeatureExtractor(net, name="tiny")
    ours = fid_from_features(ours_ext(a)["pool"], ours_ext(b)["pool"])

    tm = fid_mod.FrechetInceptionDistance(feature=net)
    tm.update(torch.from_numpy(a).permute(0, 3, 1, 2), real=True)
    tm.update(torch.from_numpy(b).permute(0, 3, 1, 2), real=False)
    theirs = float(tm.compute())
    assert ours > 1e-3
    assert abs(ours - theirs) <= 1e-3 * abs(theirs), (ours, theirs)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)) * 10 + 3
    mu, sigma = feature_statistics(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_fid_closed_form_for_diagonal_gaussians():
    # diagonal covariances: FID = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_fid_grows_with_noise():
    ext = ModuleFeatureExtractor(TinyConvNet(), name="tiny")
    ref = ext(smooth_images(400, seed=3))["pool"]
    clean = smooth_images(400, seed=4)
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (0, 10, 25, 50, 100):
        noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 255).astype(np.uint8)
        fids.append(fid_from_features(ext(noisy)["pool"], ref))
    assert all(x < y for x, y in zip(fids, fids[1:])), fids


def test_fid_singular_fallback(monkeypatch):
    real_sqrtm = metrics_mod.linalg.sqrtm
    calls = []

    def flaky_sqrtm(a):  # first call "fails" like a singular product does
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics_mod.linalg, "sqrtm", flaky_sqrtm)
    s = np.diag([1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="singular"):
        d = frechet_distance(np.zeros(2), s, np.ones(2), s)
    assert len(calls) == 2 and np.isfinite(d) and d == pytest.approx(2.0, abs=1e-5)


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_closed_forms():
    k = 10
    uniform = np.full((200, k), 1.0 / k)
    assert inception_score(uniform, splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    confident = np.repeat(np.eye(k), 5, axis=0)  # class-sorted; split i takes rows i, i + 5, ...: every class once
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    confident_logits = np.tile(np.eye(k) * 100.0, (3, 1))
    assert inception_score(confident_logits, splits=3, from_logits=True)[0] == pytest.approx(k, rel=1e-6)


def test_inception_score_of_class_sorted_samples_sees_every_class_in_every_chunk():
    # `ditmoe sample --classes all --per-class N` writes class by class: confident, correct
    # predictions of 10 classes score 10, however the file is ordered
    k = 10
    class_sorted = np.repeat(np.eye(k), 20, axis=0)
    mean, std = inception_score(class_sorted, splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    shuffled = class_sorted[np.random.default_rng(1).permutation(len(class_sorted))]
    assert inception_score(shuffled, splits=1)[0] == pytest.approx(k, rel=1e-12)


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7) * 0.3, size=60)
    scores = []
    for chunk in (p[0::3], p[1::3], p[2::3]):
        py = chunk.mean(0)
        kl = [sum(pi * np.log(pi / qi) for pi, qi in zip(row, py) if pi > 0) for row in chunk]
        scores.append(np.exp(np.mean(kl)))
    mean, std = inception_score(p, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


# ----------------------------------------------------------------------------- precision / recall

def _brute_precision_recall(real, fake, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((fake[:, None] - real[None]) ** 2).sum(-1)  # (Nf, Nr)
    precision = (d <= radii(real)[None]).any(1).mean()
    recall = (d.T <= radii(fake)[None]).any(1).mean()
    return precision, recall


def test_precision_recall_blocked_matches_brute_force():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((300, 5)), rng.standard_normal((250, 5)) + 0.5
    expected = _brute_precision_recall(real, fake, 3)
    assert precision_recall(real, fake, k=3, block=64) == pytest.approx(expected, abs=1e-9)
    r = manifold_radii(real, 3, block=50)
    ref = np.sort(((real[:, None] - real[None]) ** 2).sum(-1), 1)[:, 3]  # float64 brute force
    # fp32 |a|^2 + |b|^2 - 2 a.b from inputs rounded to fp32 (<= 4u (|a|^2 + |b|^2) on the exact
    # distance) with length-5 sums (gamma_5 ~ 5u each for |a|^2 and 2 a.b, 3u for the two additions):
    # worst case 17u (1 + O(u)) < 18u = 9 * EPS32 times |a|^2 + |b|^2, absolute (the cancellation leaves no
    # relative bound); the k-th smallest of a row moves by at most the largest error in that row.
    n2 = (real ** 2).sum(1)
    assert np.all(np.abs(r - ref) <= 9 * EPS32 * (n2 + n2.max()))


def test_precision_recall_on_gaussians():
    rng = np.random.default_rng(1)
    n, d = 1000, 4
    real, fake = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    p_same, r_same = precision_recall(real, fake)
    assert p_same > 0.9 and r_same > 0.9
    p_shift, r_shift = precision_recall(real, fake + 1.5)
    assert p_shift < p_same - 0.1 and r_shift < r_same - 0.1
    # the fake set covers one of the two modes of the real set: precise, but half the recall
    e = np.zeros(d)
    e[0] = 8.0
    two_modes = np.concatenate([rng.standard_normal((n // 2, d)) + e, rng.standard_normal((n // 2, d)) - e])
    p_sub, r_sub = precision_recall(two_modes, rng.standard_normal((n, d)) + e)
    assert p_sub > 0.9 and r_sub < 0.6


# ----------------------------------------------------------------------------- images and npz

def test_to_uint8_follows_dit_quantisation():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 7)
    out = to_uint8_nhwc(x)
    assert out.shape == (1, 1, 7, 1) and out.dtype == np.uint8
    assert out.ravel().tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert to_uint8_nhwc(np.zeros((2, 5, 5), np.uint8)).shape == (2, 5, 5, 1)
    with pytest.raises(TypeError):
        to_uint8_nhwc(np.zeros((1, 4, 4, 3), np.int32))


def test_npz_round_trip(tmp_path):
    imgs = smooth_images(6, seed=0)
    labels = np.arange(6) % 3
    path = save_samples_npz(tmp_path / "s.npz", imgs, labels)
    with np.load(path) as f:  # the ADM layout
        assert sorted(f.files) == ["arr_0", "arr_1"] and f["arr_0"].dtype == np.uint8
    back, back_labels = load_samples_npz(path)
    assert np.array_equal(back, imgs) and np.array_equal(back_labels, labels)
    _, none = load_samples_npz(save_samples_npz(tmp_path / "nolabel.npz", imgs))
    assert none is None

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 4)).astype(np.float32)
    mu, sigma = feature_statistics(feats)
    save_reference_stats(tmp_path / "ref.npz", mu, sigma, extractor="x", features=feats, num_images=50)
    st = load_reference_stats(tmp_path / "ref.npz")
    assert st["extractor"] == "x" and st["num_images"] == 50 and not st["has_images"]
    assert np.array_equal(st["mu"], mu) and np.array_equal(st["sigma"], sigma) and np.array_equal(st["features"], feats)


# ----------------------------------------------------------------------------- InceptionV3

def test_inception_weights_missing_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("DITMOE_CACHE", str(tmp_path))
    monkeypatch.delenv("DITMOE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        resolve_inception_weights()
    assert INCEPTION_WEIGHTS_FILE in str(e.value) and str(tmp_path / INCEPTION_WEIGHTS_FILE) in str(e.value)
    monkeypatch.setenv("DITMOE_INCEPTION_WEIGHTS", str(tmp_path / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        InceptionV3Extractor()
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        get_extractor("auto", smooth_images(2, seed=0))  # 3-channel images pick Inception


def _random_inception_weights(tmp_path, monkeypatch):
    """A weights file for torch-fidelity's InceptionV3 with random values (no download)."""
    cls = import_torch_fidelity_inception()
    mod = __import__(cls.__module__, fromlist=["x"])
    with monkeypatch.context() as m:
        m.setattr(mod, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(cls, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    path = tmp_path / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_extractor_with_random_weights(tmp_path, monkeypatch):
    try:
        path = _random_inception_weights(tmp_path, monkeypatch)
    except ModuleNotFoundError:
        pytest.skip("torch-fidelity not installed")
    with pytest.warns(RuntimeWarning, match="sha256"):
        ext = InceptionV3Extractor(path, batch_size=2)
    rgb = smooth_images(2, seed=0, size=32)
    out = ext(rgb)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 17 * 17 * 7)
    # the spatial features are Mixed_6d.branch1x1's first 7 channels, in (H, W, C) order
    grabbed = {}
    h = ext.net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, i, o: grabbed.setdefault("x", o.clone()))
    with torch.no_grad():  # the extractor's batch (both images, standard strides) into the same net
        ext.net(torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous())
    h.remove()
    # Same input batch, same shapes and strides, same net: the same ops in the same order, bit for bit.
    assert np.array_equal(out["spatial"], grabbed["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy())
    grey = ext(rgb[:1, ..., :1])  # grey images are repeated to RGB
    same = ext(np.repeat(rgb[:1, ..., :1], 3, axis=-1))
    # The same pixels in a fresh tensor of the same shape and strides either way (features.py): bit for bit.
    assert np.array_equal(grey["pool"], same["pool"])


# ----------------------------------------------------------------------------- MNIST classifier

@pytest.fixture(scope="module")
def small_classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "mnist_classifier.safetensors"
    info = train_mnist_classifier(out, epochs=1, batch_size=32, limit=2000, eval_limit=2000, verbose=False)
    return info


def test_mnist_data_and_input():
    x, y = load_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.shape == (10000,)
    assert x.max() == 255 and set(np.unique(y)) == set(range(10))
    inp = mnist_to_input(torch.from_numpy(x[:2]).unsqueeze(1))
    assert inp.shape == (2, 1, 32, 32) and inp.min() == -1.0 and inp.max() == 1.0
    assert torch.all(inp[..., :2, :] == -1.0)  # the padding is background


def test_mnist_classifier_trains_and_round_trips(small_classifier):
    info = small_classifier
    assert info["test_accuracy"] > 0.8, info
    loaded = load_mnist_classifier(info["path"])
    x = mnist_to_input(torch.from_numpy(load_mnist("test")[0][:64]).unsqueeze(1))
    with torch.no_grad():
        assert torch.equal(info["model"](x), loaded(x))


def test_mnist_classifier_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist_classifier"):
        load_mnist_classifier(tmp_path / "mnist_classifier.safetensors")


def test_evaluate_mnist_end_to_end(small_classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("DITMOE_CACHE", str(tmp_path / "cache"))
    import shutil

    (tmp_path / "cache").mkdir()
    shutil.copy(small_classifier["path"], tmp_path / "cache" / "mnist_classifier.safetensors")
    x, y = load_mnist("test")
    ref, samples, labels = x[:1000], x[1000:1600], y[1000:1600]
    save_samples_npz(tmp_path / "samples.npz", samples, labels)

    r = evaluate(tmp_path / "samples.npz", ref)  # "auto" -> the MNIST classifier; labels from arr_1
    assert r["extractor"] == MNISTClassifierExtractor.name
    assert r["num_samples"] == 600 and r["num_ref"] == 1000 and r["sfid"] is None
    assert r["class_agreement"] > 0.8 and 1.0 < r["inception_score"] <= 10.0
    assert r["precision"] > 0.5 and r["recall"] > 0.5
    noise = np.random.default_rng(0).integers(0, 256, (600, 28, 28, 1), dtype=np.uint8)
    r_noise = evaluate(noise, ref, extractor="mnist", labels=labels)
    assert r_noise["fid"] > 10 * r["fid"] and r_noise["precision"] < r["precision"]
    assert "mnist-cnn" in format_results(r)

    # a reference cache gives the same numbers as the reference images
    compute_reference_stats(ref, "mnist", out=tmp_path / "ref_stats.npz")
    r_cached = evaluate(samples, tmp_path / "ref_stats.npz", labels=labels)
    for key in ("fid", "inception_score", "precision", "recall", "class_agreement"):
        assert r_cached[key] == pytest.approx(r[key], rel=1e-12, abs=1e-12), key
    # statistics of another extractor are refused when there are no images to recompute from
    tiny = ModuleFeatureExtractor(TinyConvNet(), name="tiny", preprocess=lambda t: t.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="mnist-cnn"):
        evaluate(samples, tmp_path / "ref_stats.npz", extractor=tiny)


def test_untrained_classifier_extractor_shapes():
    torch.manual_seed(0)
    ext = MNISTClassifierExtractor(MNISTClassifier())
    out = ext(np.zeros((3, 32, 32, 1), np.uint8))
    assert out["pool"].shape == (3, 128) and out["logits"].shape == (3, 10)
    with pytest.raises(ValueError):
        ext(np.zeros((2, 32, 32, 3), np.uint8))


def test_features_do_not_depend_on_memory_layout():
    # (N, H, W) grey arrays get a stride-0 channel axis; the features must not notice
    torch.manual_seed(0)
    ext = MNISTClassifierExtractor(MNISTClassifier())
    x = load_mnist("test")[0][100:400]
    a = ext(x)["pool"]
    b = ext(np.ascontiguousarray(x[..., None]))["pool"]
    c = ext(np.ascontiguousarray(np.moveaxis(np.stack([x]), 0, -1)))["pool"]
    assert np.array_equal(a, b) and np.array_equal(a, c)
