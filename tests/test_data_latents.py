"""VAE wrapper and latent cache, against a tiny randomly initialised diffusers AutoencoderKL."""

from __future__ import annotations

import io
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from ditmoe.data import build_dataset  # noqa: E402
from ditmoe.data.latents import LatentDataset, extract_latents, read_latent_metadata  # noqa: E402
from ditmoe.data.vae import SD_SCALING_FACTOR, VAE, load_vae  # noqa: E402
from conftest import reference_center_crop  # noqa: E402
from tolerances import TINY_VAE_ENC_CHAIN, TINY_VAE_ENC_K, assert_close_fp32, fp32_tol, rel_err, rounded_rel_tol  # noqa: E402

# Two fp32 encodes of the tiny VAE in different batches (other conv blocking, other summation
# order): norm-relative within fp32_tol(TINY_VAE_ENC_K, TINY_VAE_ENC_CHAIN) (tolerances.py).
ENC = dict(reduction_len=TINY_VAE_ENC_K, chain=TINY_VAE_ENC_CHAIN)

SIZE = 32  # pixels; the tiny VAE downsamples 2x -> 16x16x4 latents


def ref_tensor(path: str, image_size: int) -> torch.Tensor:
    with Image.open(path) as im:
        arr = reference_center_crop(im.convert("RGB"), image_size)
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def save_img(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def tiny_autoencoder(scaling_factor: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kw = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=32, **kw,
    ).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vae")
    tiny_autoencoder().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vae(vae_dir) -> VAE:
    return load_vae(vae_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    sizes = {"b_dog": [(40, 36), (64, 48), (33, 80)], "a_cat": [(32, 32), (90, 50)]}
    k = 0
    for c, ss in sizes.items():
        for w, h in ss:
            save_img(root / c / f"{k}.png", w, h, seed=k)
            k += 1
    (root / "b_dog" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def cache32(folder, vae, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lat") / "lat32.safetensors"
    return extract_latents(folder, vae, out, image_size=SIZE, batch_size=2, dtype="float32", progress=False)


# ------------------------------------------------------------------------------------ VAE
def test_vae_wrapper_matches_diffusers(vae):
    ref = tiny_autoencoder()
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    mean, logvar = vae.encode(x)
    with torch.no_grad():  # as the wrapper runs it
        dist = ref.encode(x).latent_dist
    # Same weights (saved and loaded exactly), same input and batch, same modules: the same ops in
    # the same order, bit for bit.
    torch.testing.assert_close(mean, dist.mean.detach(), rtol=0, atol=0)
    torch.testing.assert_close(logvar, dist.logvar.detach(), rtol=0, atol=0)
    assert vae.scaling_factor == SD_SCALING_FACTOR == 0.18215
    assert vae.latent_shape(SIZE) == (4, 16, 16) == tuple(mean.shape[1:])
    # The wrapper runs the same encode and the same scalar product: bit for bit (so below).
    torch.testing.assert_close(vae.encode_latents(x, sample=False), mean * 0.18215, rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    z = vae.encode_latents(x, generator=g)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, (mean + torch.exp(0.5 * logvar) * eps) * 0.18215, rtol=0, atol=0)
    img = vae.decode(z)
    with torch.no_grad():
        img_ref = ref.decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(img, img_ref, rtol=0, atol=0)
    assert img.shape == (3, 3, SIZE, SIZE) and float(img.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="not divisible"):
        vae.latent_shape(33)


def test_vae_scaling_factor_from_config_and_override(tmp_path):
    tiny_autoencoder(scaling_factor=0.5).save_pretrained(tmp_path / "v")
    assert load_vae(tmp_path / "v").scaling_factor == 0.5
    assert load_vae(tmp_path / "v", scaling_factor=0.25).scaling_factor == 0.25


def test_vae_pipeline_folder_layout(vae_dir, tmp_path):
    import shutil

    shutil.copytree(vae_dir, tmp_path / "sd" / "vae")  # a full SD pipeline folder
    assert load_vae(tmp_path / "sd").latent_channels == 4


def test_vae_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*huggingface-cli download"):
        load_vae(tmp_path / "missing")
    (tmp_path / "novae").mkdir()
    (tmp_path / "novae" / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config\.json \(it holds: \['weights\.bin'\]\)"):
        load_vae(tmp_path / "novae")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'ditmoe\[latent\]'"):
        load_vae(tmp_path / "ok")


def test_no_diffusers_import_at_module_import():
    code = (
        "import sys, ditmoe.data, ditmoe.data.vae, ditmoe.data.latents, ditmoe.data.folder, ditmoe.data.mnist\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported eagerly'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys, ditmoe.data; assert 'torch' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# -------------------------------------------------------------------------- latent cache
def test_cache_matches_vae_encode(cache32, folder, vae):
    meta = read_latent_metadata(cache32)
    assert meta["class_names"] == ["a_cat", "b_dog"]
    assert (meta["image_size"], meta["latent_size"], meta["latent_channels"]) == (SIZE, 16, 4)
    assert meta["scaling_factor"] == 0.18215 and meta["num_images"] == 5 and meta["num_skipped"] == 1
    assert [Path(p).name for p in meta["skipped"]] == ["broken.png"]
    ds = LatentDataset(cache32, flip=False)
    paths = sorted(str(p) for p in folder.rglob("*.png") if p.name != "broken.png")
    paths.sort(key=lambda p: (Path(p).parent.name, Path(p).name))
    assert len(ds) == len(paths) == 5
    for i, p in enumerate(paths):
        x = ref_tensor(p, SIZE)[None]
        m_ref, lv_ref = vae.encode(x)
        mf_ref, lvf_ref = vae.encode(x.flip(-1))
        m, lv = ds.moments(i)
        mf, lvf = ds.moments(i, mirror=True)
        # The cache encoded this image in a batch of images and mirrors, the reference alone: two
        # fp32 encodes in different batches (ENC). The pixels are the same bits (both sides
        # x / 127.5 - 1 in fp32 from the same crop).
        assert_close_fp32(m, m_ref[0], **ENC, what=f"mean {p}")
        assert_close_fp32(lv, lv_ref[0], **ENC, what=f"logvar {p}")
        assert_close_fp32(mf, mf_ref[0], **ENC, what=f"mirror mean {p}")
        assert_close_fp32(lvf, lvf_ref[0], **ENC, what=f"mirror logvar {p}")
        assert rel_err(mf, m) > 100 * fp32_tol(**ENC)  # the mirror is a different image, not rounding
        assert int(ds.labels[i]) == ["a_cat", "b_dog"].index(Path(p).parent.name)


def test_cache_is_standard_safetensors(cache32):
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = load_file(cache32)
    assert set(d) == {"labels", "mean", "logvar"}
    assert d["mean"].shape == (5, 2, 4, 16, 16) and d["mean"].dtype == torch.float32
    assert d["labels"].dtype == torch.int64
    ds = LatentDataset(cache32)
    # The same stored fp32 bytes read two ways: bit for bit.
    torch.testing.assert_close(d["mean"][3, 1], ds.moments(3, mirror=True)[0], rtol=0, atol=0)
    torch.testing.assert_close(d["labels"], ds.labels, rtol=0, atol=0)
    with safe_open(str(cache32), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == ["a_cat", "b_dog"]


def test_float16_cache_close_to_float32(cache32, folder, vae, tmp_path):
    out = extract_latents(folder, vae, tmp_path / "lat16.safetensors", image_size=SIZE, batch_size=4, progress=False)
    d16 = LatentDataset(out, flip=False)
    d32 = LatentDataset(cache32, flip=False)
    assert d16._get()["mean"].dtype == np.float16
    assert out.stat().st_size < cache32.stat().st_size * 0.55
    for i in range(len(d32)):
        for mirror in (False, True):
            m16, lv16 = d16.moments(i, mirror)
            m32, lv32 = d32.moments(i, mirror)
            # Encoded in other batches (4 images + mirrors vs 2: ENC apart in fp32), then rounded
            # once to float16 (u16 relative, half a subnormal spacing below 2^-14): rounded_rel_tol.
            for a16, a32, what in ((m16, m32, "mean"), (lv16, lv32, "logvar")):
                err, tol = rel_err(a16, a32), rounded_rel_tol(torch.float16, a32, fp32_tol(**ENC))
                assert err <= tol, f"{what} {i} mirror={mirror}: {err:.3g} > {tol:.3g}"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        extract_latents(folder, vae, out, image_size=SIZE, progress=False)


def test_latent_dataset_sampling(cache32):
    ds = LatentDataset(cache32, flip=True)
    mirrors = set()
    for seed in range(16):
        i = seed % len(ds)
        torch.manual_seed(seed)
        z, y = ds[i]
        assert z.shape == (4, 16, 16) and z.dtype == torch.float32
        assert y.dtype == torch.int64 and int(y) == int(ds.labels[i])
        # Same draws in the same order: flip coin, then eps.
        torch.manual_seed(seed)
        mirror = bool(torch.rand(()) < 0.5)
        mean, logvar = ds.moments(i, mirror)
        eps = torch.randn(mean.shape)
        # The dataset's draw: the same fp32 elementwise ops on the same stored moments and the same
        # normal draws, in the same order: bit for bit (so in the batch below).
        torch.testing.assert_close(z, (mean + torch.exp(0.5 * logvar) * eps) * 0.18215, rtol=0, atol=0)
        mirrors.add(mirror)
    assert mirrors == {True, False}
    zb, yb = ds.get_batch([4, 0, 2])
    assert zb.shape == (3, 4, 16, 16) and yb.tolist() == [int(ds.labels[i]) for i in (4, 0, 2)]
    noflip = LatentDataset(cache32, flip=False)
    torch.manual_seed(0)
    zb, _ = noflip.get_batch([1, 1])
    torch.manual_seed(0)
    eps = torch.randn(2, 4, 16, 16)
    mean, logvar = noflip.moments(1)
    torch.testing.assert_close(zb, (mean + torch.exp(0.5 * logvar) * eps) * 0.18215, rtol=0, atol=0)


def test_latent_dataset_pickles_without_data(cache32):
    ds = LatentDataset(cache32)
    ds[0]  # maps the file
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the maps are not shipped to workers
    ds2 = pickle.loads(blob)
    # The same stored fp32 bytes (unpickled map, in-memory copy): bit for bit.
    torch.testing.assert_close(ds2.moments(2)[0], ds.moments(2)[0], rtol=0, atol=0)
    mem = LatentDataset(cache32, in_memory=True)
    torch.testing.assert_close(mem.moments(2, True)[1], ds.moments(2, True)[1], rtol=0, atol=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    zb, yb = next(iter(loader))
    assert zb.shape == (4, 4, 16, 16) and yb.dtype == torch.int64


def test_build_dataset_latent(cache32, tmp_path):
    ds, info = build_dataset(cache32)
    assert info.is_latent and (info.image_size, info.channels, info.num_classes) == (16, 4, 2)
    assert info.pixel_size == SIZE and info.scaling_factor == 0.18215 and info.num_items == 5
    assert info.class_names == ["a_cat", "b_dog"] and isinstance(ds, LatentDataset)
    assert build_dataset(cache32, image_size=16, flip=False)[0].flip is False  # the trainer's call
    with pytest.raises(ValueError, match=r"holds 16x16 latents \(4 channels, from 32x32 images\).*image_size=8.*16 px"):
        build_dataset(cache32, image_size=8)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a ditmoe latent cache"):
        build_dataset(tmp_path / "model.safetensors")


def test_extract_drops_images_that_fail_to_decode(folder, vae, cache32, tmp_path, caplog):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(folder, root)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "a_cat" / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # passes verify()
    with caplog.at_level(logging.WARNING):
        out = extract_latents(root, vae, tmp_path / "c.safetensors", image_size=SIZE, batch_size=4, dtype="float32", progress=False)
    meta = read_latent_metadata(out)
    assert meta["num_images"] == 5 and meta["num_skipped"] == 2
    assert sorted(Path(p).name for p in meta["skipped"]) == ["broken.png", "trunc.jpg"]
    from safetensors.torch import load_file

    d = load_file(out)  # still a valid file after compaction
    assert d["mean"].shape[0] == 5 and d["labels"].tolist() == [0, 0, 1, 1, 1]
    ref = load_file(cache32)  # same five good images
    # Batches of 4 here, of 2 in cache32: two fp32 encodes in different batches (ENC).
    assert_close_fp32(d["mean"], ref["mean"], **ENC, what="mean")
    assert_close_fp32(d["logvar"], ref["logvar"], **ENC, what="logvar")
    assert not (tmp_path / "c.safetensors.partial").exists()
    assert "trunc.jpg" in caplog.text


def test_cli_extract_latents_allow_upscale_and_verify_images(vae_dir, tmp_path, capsys, caplog):
    from ditmoe.cli import main

    root = tmp_path / "imgs"
    save_img(root / "a" / "0.png", 40, 40, seed=1)
    save_img(root / "a" / "small.png", 20, 24, seed=2)  # below --image-size 32
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "a" / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # passes the fast check
    args = ["extract-latents", "--data", str(root), "--vae", str(vae_dir), "--image-size", str(SIZE)]
    assert main([*args, "--out", str(tmp_path / "refused.safetensors")]) == 2
    assert "extract-latents --allow-upscale" in capsys.readouterr().err
    assert not (tmp_path / "refused.safetensors").exists()
    with caplog.at_level(logging.WARNING, logger="ditmoe.data.folder"):
        assert main([*args, "--out", str(tmp_path / "c.safetensors"), "--allow-upscale", "--verify-images", "full"]) == 0
    # The full check found the truncated file before any encoding (the folder's warning, then the CLI's line).
    assert "skipped 1 unreadable image file(s)" in caplog.text and "trunc.jpg" in caplog.text
    out = capsys.readouterr().out
    assert "left out 1 unreadable image file(s)" in out and "trunc.jpg" in out and "(2 images)" in out
    meta = read_latent_metadata(tmp_path / "c.safetensors")
    assert meta["num_images"] == 2 and [Path(p).name for p in meta["skipped"]] == ["trunc.jpg"]
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "d.safetensors"), "--verify-images", "all"])


def _extract_worker(rank: int, world: int, folder: str, vae_dir: str, out: str) -> None:
    vae = load_vae(vae_dir)
    encode, rows = vae.encode, []
    vae.encode = lambda x: (rows.append(len(x)), encode(x))[1]
    extract_latents(folder, vae, out, image_size=SIZE, batch_size=2, dtype="float32", progress=False, save_every=1)
    Path(f"{out}.rank{rank}").write_text(json.dumps(rows))  # the batches this process encoded


@pytest.fixture()
def folder_with_bad_files(folder, tmp_path) -> Path:
    """The module's folder (one file that is no image) plus a truncated JPEG that only fails to decode."""
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(folder, root)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "b_dog" / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


def test_extract_under_two_processes_equals_one_process(folder_with_bad_files, vae_dir, tmp_path):
    from safetensors.torch import load_file

    from ditmoe.parallel.launch import spawn_local

    root = folder_with_bad_files
    one = extract_latents(root, vae_dir, tmp_path / "one.safetensors", image_size=SIZE, batch_size=2,
                          dtype="float32", progress=False, save_every=1)
    # 6 readable files in chunks of 2 images: rank 0 encodes chunks 0 and 2, rank 1 chunk 1 (with trunc.jpg).
    spawn_local(_extract_worker, 2, str(root), str(vae_dir), str(tmp_path / "two.safetensors"))
    a, b = load_file(one), load_file(tmp_path / "two.safetensors")
    # The same batches through the same code in one thread each: bit for bit.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["labels"].tolist() == [0, 0, 1, 1, 1]
    ma, mb = read_latent_metadata(one), read_latent_metadata(tmp_path / "two.safetensors")
    assert ma == mb and sorted(Path(p).name for p in mb["skipped"]) == ["broken.png", "trunc.jpg"]
    assert not (tmp_path / "two.safetensors.parts").exists() and not (tmp_path / "two.safetensors.partial").exists()
    # Each process encoded its own share only (rows = images and their mirrors; trunc.jpg never reaches the VAE).
    encoded = [json.loads((tmp_path / f"two.safetensors.rank{r}").read_text()) for r in (0, 1)]
    assert encoded == [[4, 2], [4]]


def test_interrupted_extraction_resumes_from_its_chunks(folder_with_bad_files, vae_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    root = folder_with_bad_files
    kw = dict(image_size=SIZE, batch_size=2, dtype="float32", progress=False, save_every=1)
    ref = extract_latents(root, vae_dir, tmp_path / "ref.safetensors", **kw)
    vae = load_vae(vae_dir)
    encode, calls = vae.encode, []

    def interrupted(x):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C in the third batch would
        calls.append(len(x))
        return encode(x)

    out = tmp_path / "c.safetensors"
    monkeypatch.setattr(vae, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_latents(root, vae, out, **kw)
    parts = sorted(p.name for p in (tmp_path / "c.safetensors.parts").iterdir())
    assert parts == ["chunk_0000000.safetensors", "chunk_0000001.safetensors"] and not out.exists()
    calls.clear()
    monkeypatch.setattr(vae, "encode", lambda x: (calls.append(len(x)), encode(x))[1])
    extract_latents(root, vae, out, **kw)
    # Only the third chunk (b_dog/2.png and trunc.jpg, which fails to decode): one image and its mirror.
    assert calls == [2]
    a, b = load_file(ref), load_file(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batches through the same code: bit for bit
    # Chunks written under other settings (here float16 storage) are encoded again, not mixed in.
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(vae, "encode", interrupted)
        calls.clear()
        extract_latents(root, vae, tmp_path / "d.safetensors", **kw)
    calls.clear()
    monkeypatch.setattr(vae, "encode", lambda x: (calls.append(len(x)), encode(x))[1])
    extract_latents(root, vae, tmp_path / "d.safetensors", **{**kw, "dtype": "float16"})
    assert len(calls) == 3
