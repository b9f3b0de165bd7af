"""Latent cache: encode an image folder once, train on VAE latents without a VAE in memory.

File format: one standard safetensors file (loadable with `safetensors.torch.load_file`) with
  labels  (N,)                 int64
  mean    (N, 2, C, h, w)      float16 or float32   unscaled VAE posterior mean
  logvar  (N, 2, C, h, w)      same dtype           unscaled VAE posterior log-variance
where index 1 of dim 1 is the horizontally mirrored image. The metadata holds the class names,
the scaling factor and the image / latent sizes.

Why this layout: safetensors stores each tensor as one contiguous little-endian block after a
JSON header, so the file is written here in a streaming way (header first, rows through a
memory map; constant memory for ImageNet-size folders) and read through `numpy.memmap` at the
header's offsets: opening is instant, an item is two small contiguous reads, and DataLoader
workers share the OS page cache instead of each holding a copy. logvar rather than std is stored
because the SD VAE's std is tiny and float16 would lose it to subnormals; logvar in float16 is
good to about 0.5% of std, far below the sampling noise it scales.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .folder import ImageFolderDataset
from .vae import SD_SCALING_FACTOR, VAE, load_vae

log = logging.getLogger(__name__)

FORMAT_NAME = "ditmoe-latents"
FORMAT_VERSION = "1"
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


# --------------------------------------------------------------------- safetensors, streamed
def _create_safetensors(
    path: Path, specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> dict[str, np.memmap]:
    """Write a safetensors header for ``specs`` and return writable memmaps over each tensor."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dt, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _NP_TO_ST[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-(8 + len(hbytes)) % 8)  # keep the data 8-byte aligned, as safetensors does
    start = 8 + len(hbytes)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        f.truncate(start + offset)  # sparse until written
    return _map_tensors(path, header, start, mode="r+")


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"'{path}' is not a latent cache (too short for a safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"'{path}' is not a safetensors latent cache (header length {n})")
        hbytes = f.read(n)
    try:
        header = json.loads(hbytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"'{path}' is not a safetensors latent cache ({e})") from e
    return header, 8 + n


def _map_tensors(path: Path, header: dict[str, Any], start: int, mode: str = "r") -> dict[str, np.memmap]:
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        shape = tuple(e["shape"])
        if int(np.prod(shape, dtype=np.int64)) == 0:
            out[name] = np.zeros(shape, _ST_DTYPES[e["dtype"]])
            continue
        out[name] = np.memmap(path, dtype=_ST_DTYPES[e["dtype"]], mode=mode, offset=start + e["data_offsets"][0], shape=shape)
    return out


def read_latent_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The cache's metadata, decoded (class_names as a list, sizes as ints, scaling_factor float)."""
    path = Path(path)
    header, _ = _read_safetensors_header(path)
    meta = dict(header.get("__metadata__") or {})
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"'{path}' is a safetensors file but not a ditmoe latent cache (no format={FORMAT_NAME!r} in its "
            "metadata). Make one with ditmoe.data.extract_latents(folder, vae_dir, out_path, ...)."
        )
    out: dict[str, Any] = dict(meta)
    out["class_names"] = json.loads(meta["class_names"])
    out["skipped"] = json.loads(meta.get("skipped", "[]"))
    out["scaling_factor"] = float(meta["scaling_factor"])
    for k in ("image_size", "latent_size", "latent_channels", "num_images", "num_skipped"):
        if k in meta:
            out[k] = int(meta[k])
    out["shape"] = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    return out


def is_latent_cache(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file that carries the ditmoe latent cache metadata."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        read_latent_metadata(p)
        return True
    except (ValueError, KeyError, OSError):
        return False


# --------------------------------------------------------------------------------- extraction
class _Loadable(Dataset):
    """Wraps an ImageFolderDataset so a file that fails to decode becomes a flagged row, not a crash."""

    def __init__(self, ds: ImageFolderDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            x, y = self.ds.load(i)
            return x, y, True, i
        except Exception as e:
            log.warning("failed to decode %s (%s: %s); leaving it out", self.ds.samples[i][0], type(e).__name__, e)
            c, s = self.ds.channels, self.ds.image_size
            return torch.zeros(c, s, s), torch.tensor(-1), False, i


def _join_world() -> tuple[int, int, Any]:
    """(rank, world, torch.distributed or None) from torchrun's RANK / WORLD_SIZE.

    The default group is joined (gloo) when nothing has joined it yet: extraction only needs
    small collectives (a barrier and one broadcast), which gloo does on any device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} is set but RANK is not: launch with torchrun (it sets both), or unset "
                         "WORLD_SIZE to extract in one process")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist


def _settings_key(ds: ImageFolderDataset, vae: VAE, image_size: int, dtype: str, chunk: int) -> str:
    """What a chunk file's rows depend on; a chunk written under other settings is encoded again."""
    import hashlib

    def stamp(path: str) -> str:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"

    # Names, labels, sizes and modification times: an image replaced since a chunk was written
    # makes that extraction start afresh.
    files = hashlib.sha1("\n".join(f"{p}\t{y}\t{stamp(p)}" for p, y in ds.samples).encode()).hexdigest()
    return json.dumps({"files": files, "n": len(ds), "image_size": image_size, "vae": str(getattr(vae, "path", "")),
                       "scaling_factor": vae.scaling_factor, "dtype": dtype, "chunk": chunk}, sort_keys=True)


def _chunk_done(path: Path, key: str, rows: int) -> bool:
    """True when `path` is a complete chunk (chunks are renamed into place whole) of these settings."""
    if not path.is_file():
        return False
    try:
        header, _ = _read_safetensors_header(path)
    except (ValueError, OSError):
        return False
    return (header.get("__metadata__") or {}).get("settings") == key and header.get("labels", {}).get("shape") == [rows]


def extract_latents(
    folder: str | os.PathLike,
    vae_dir: str | os.PathLike | VAE,
    out_path: str | os.PathLike,
    image_size: int = 256,
    batch_size: int = 32,
    *,
    dtype: str = "float16",
    device: str | torch.device = "cpu",
    vae_dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    allow_upscale: bool = False,
    verify: str = "fast",
    overwrite: bool = False,
    progress: bool = True,
    save_every: int = 50,
) -> Path:
    """Encode every image of ``folder`` and its horizontal mirror; write a latent cache file.

    Images go through the same ADM center crop as `ImageFolderDataset`; the mirror is the flipped
    crop. ``vae_dir`` is a local diffusers VAE folder (or an already loaded `VAE`). ``dtype`` is
    the storage type of mean / logvar ("float16" halves the file; "float32" is exact). Returns
    ``out_path``.

    The images are encoded in chunks of ``save_every`` batches (image i is in batch i //
    batch_size whatever the number of processes), each written whole to ``out_path + '.parts/'``
    as it completes. An interrupted extraction run again with the same settings skips the chunks
    already there. Under torchrun (RANK / WORLD_SIZE set) process r encodes chunks r, r + world,
    ...; rank 0 then joins the chunks, in image order, into ``out_path + '.partial'``, renames it
    to ``out_path`` and removes the chunks, so the file equals a one-process extraction's.
    """
    out_path = Path(out_path).expanduser()
    if dtype not in _STORE_DTYPES:
        raise ValueError(f"dtype must be one of {list(_STORE_DTYPES)}, got {dtype!r}")
    if save_every < 1:
        raise ValueError(f"save_every must be at least 1 batch, got {save_every}")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"latent cache '{out_path}' already exists; delete it or pass overwrite=True")
    if out_path.is_dir():
        raise IsADirectoryError(f"out_path '{out_path}' is a folder; give a file name such as latents.safetensors")
    rank, world, dist = _join_world()
    if world > 1 and str(device) == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    ds = ImageFolderDataset(folder, image_size, flip=False, allow_upscale=allow_upscale, verify=verify, channels=3,
                            progress=progress and rank == 0)
    vae = vae_dir if isinstance(vae_dir, VAE) else load_vae(vae_dir, device=device, dtype=vae_dtype)
    c, h, w = vae.latent_shape(image_size)
    n = len(ds)
    np_dt = _STORE_DTYPES[dtype]
    chunk = batch_size * save_every
    key = _settings_key(ds, vae, image_size, dtype, chunk)
    parts = out_path.with_name(out_path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    chunks = range(rank, -(-n // chunk), world)

    def chunk_path(k: int) -> Path:
        return parts / f"chunk_{k:07d}.safetensors"

    todo = [k for k in chunks if not _chunk_done(chunk_path(k), key, min(n, (k + 1) * chunk) - k * chunk)]
    done_before = len(chunks) - len(todo)
    if done_before and rank == 0:
        log.info("resuming the extraction into %s: %d chunk(s) of %d images already encoded", out_path,
                 done_before, chunk)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(min(n, (k + 1) * chunk) - k * chunk for k in todo), desc="encoding latents", unit="img",
               disable=not progress or rank != 0)
    for k in todo:
        lo, hi = k * chunk, min(n, (k + 1) * chunk)
        sub = torch.utils.data.Subset(_Loadable(ds), range(lo, hi))
        labels = np.full(hi - lo, -1, np.int64)  # -1: the file failed to decode
        mean_all = np.zeros((hi - lo, 2, c, h, w), np_dt)
        logvar_all = np.zeros_like(mean_all)
        for x, y, ok, idx in DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            bar.update(len(y))
            rows = (idx[ok] - lo).numpy()
            x, y = x[ok], y[ok]
            b = x.shape[0]
            if b == 0:
                continue
            mean, logvar = vae.encode(torch.cat([x, x.flip(-1)]))  # (2B, C, h, w): images, then mirrors
            if mean.shape[1:] != (c, h, w):
                raise RuntimeError(f"VAE returned latents of shape {tuple(mean.shape[1:])}, expected {(c, h, w)}")
            mean_all[rows] = mean.view(2, b, c, h, w).transpose(0, 1).cpu().numpy().astype(np_dt)
            logvar_all[rows] = logvar.view(2, b, c, h, w).transpose(0, 1).cpu().numpy().astype(np_dt)
            labels[rows] = y.numpy()
        from safetensors.numpy import save_file

        from ..weights_io import atomic_write

        tensors = {"labels": labels, "mean": mean_all, "logvar": logvar_all}
        atomic_write(chunk_path(k), lambda tmp: save_file(tensors, tmp, metadata={"settings": key}))
    bar.close()

    error = None
    if rank == 0:
        if dist is not None:
            dist.barrier()  # every chunk is on disk
        try:
            meta = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "class_names": json.dumps(ds.class_names),
                "image_size": str(image_size),
                "latent_size": str(h),
                "latent_channels": str(c),
                "scaling_factor": repr(vae.scaling_factor),
                "moments": "mean, logvar (unscaled); dim 1: 0 = image, 1 = horizontal mirror",
                "source": str(Path(folder).expanduser().resolve()),
                "vae": str(getattr(vae, "path", "")),
                "crop": "adm_center_crop",
            }
            _merge_chunks(ds, [chunk_path(k) for k in range(-(-n // chunk))], out_path, meta, np_dt, (c, h, w))
            import shutil

            shutil.rmtree(parts, ignore_errors=True)
        except Exception as e:  # reported on every rank, so no process waits for a file that will not come
            error = e
    elif dist is not None:
        dist.barrier()
    if dist is not None:
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if rank != 0 and status[0] is not None:
            raise RuntimeError(f"rank 0 could not write the latent cache '{out_path}': {status[0]}")
    if error is not None:
        raise error
    return out_path


def _merge_chunks(ds: ImageFolderDataset, chunk_files: list[Path], out_path: Path, meta: dict[str, str],
                  np_dt: Any, latent: tuple[int, int, int]) -> None:
    """Join the chunk files, in image order and without the images that failed to decode, into `out_path`."""
    from safetensors.numpy import load_file

    labels = [load_file(str(p))["labels"] for p in chunk_files]  # small: one int64 per image
    written = int(sum((lab >= 0).sum() for lab in labels))
    failed, pos = [], 0
    for lab in labels:
        failed.extend(ds.samples[pos + int(i)][0] for i in np.flatnonzero(lab < 0))
        pos += len(lab)
    if written == 0:
        raise ValueError(f"no image under '{ds.root}' could be decoded; nothing written to '{out_path}'")
    skipped = list(ds.skipped) + failed
    meta = dict(meta, num_images=str(written), num_skipped=str(len(skipped)), skipped=json.dumps(skipped[:1000]))
    tmp = out_path.with_name(out_path.name + ".partial")
    specs = [("labels", np.int64, (written,)), ("mean", np_dt, (written, 2, *latent)),
             ("logvar", np_dt, (written, 2, *latent))]
    dst = _create_safetensors(tmp, specs, meta)
    at = 0
    for p, lab in zip(chunk_files, labels):
        keep = lab >= 0
        m = int(keep.sum())
        if m:
            part = load_file(str(p))
            for name in ("labels", "mean", "logvar"):
                dst[name][at:at + m] = part[name][keep]
        at += m
    for a in dst.values():
        if isinstance(a, np.memmap):
            a.flush()
    del dst
    os.replace(tmp, out_path)
    if skipped:
        log.warning("latent cache %s: %d image(s) skipped as unreadable", out_path, len(skipped))


# ----------------------------------------------------------------------------------- dataset
class LatentDataset(Dataset):
    """Items from a latent cache: (z float32 (C, h, w), int64 label), z sampled afresh each access.

    z = (mean + exp(logvar / 2) * eps) * scaling_factor, with the mirrored entry chosen with
    probability 0.5 when ``flip``. Reads go through memory maps (``in_memory=True`` copies the
    whole cache into RAM instead). No VAE is loaded.
    """

    def __init__(self, path: str | os.PathLike, flip: bool = True, in_memory: bool = False):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"latent cache '{self.path}' does not exist. Make one with "
                "ditmoe.data.extract_latents(folder, vae_dir, out_path, image_size)."
            )
        self.meta = read_latent_metadata(self.path)
        self.flip = flip
        self.in_memory = in_memory
        self.class_names: list[str] = self.meta["class_names"]
        self.scaling_factor: float = self.meta["scaling_factor"]
        shape = self.meta["shape"]["mean"]  # (N, 2, C, h, w)
        self.latent_shape: tuple[int, int, int] = tuple(shape[2:])
        self._arrays: dict[str, np.ndarray] | None = None
        self.labels = torch.from_numpy(np.array(self._get()["labels"]))  # (N,) int64

    def _get(self) -> dict[str, np.ndarray]:
        # Opened lazily so that a pickled dataset (spawned DataLoader workers) maps the file again
        # instead of shipping its contents.
        if self._arrays is None:
            header, start = _read_safetensors_header(self.path)
            arrays = _map_tensors(self.path, header, start)
            if self.in_memory:
                arrays = {k: np.array(v) for k, v in arrays.items()}
            self._arrays = arrays
        return self._arrays

    def __getstate__(self):
        state = self.__dict__.copy()
        if not self.in_memory:
            state["_arrays"] = None
        return state

    @property
    def image_size(self) -> int:
        """Spatial size of the latents (what the model sees)."""
        return int(self.latent_shape[-1])

    @property
    def channels(self) -> int:
        return int(self.latent_shape[0])

    @property
    def pixel_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def moments(self, i: int, mirror: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored unscaled (mean, logvar) of item i (or of its mirror), float32 (C, h, w)."""
        a = self._get()
        f = int(mirror)
        return torch.from_numpy(a["mean"][i, f].astype(np.float32)), torch.from_numpy(a["logvar"][i, f].astype(np.float32))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        mirror = bool(self.flip and torch.rand(()) < 0.5)
        mean, logvar = self.moments(i, mirror)
        z = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * self.scaling_factor
        return z, self.labels[i]

    def get_batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: (B, C, h, w) float32 latents and (B,) int64 labels."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        f = (torch.rand(idx.shape[0]) < 0.5).long() if self.flip else torch.zeros_like(idx)
        a = self._get()
        ii, ff = idx.numpy(), f.numpy()
        mean = torch.from_numpy(a["mean"][ii, ff].astype(np.float32))
        logvar = torch.from_numpy(a["logvar"][ii, ff].astype(np.float32))
        z = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * self.scaling_factor
        return z, self.labels[idx]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # DataLoader's batched fetch: one gather from the memory map instead of B small reads.
        z, y = self.get_batch(indices)
        return list(zip(z.unbind(0), y.unbind(0)))


__all__ = [
    "extract_latents",
    "LatentDataset",
    "read_latent_metadata",
    "is_latent_cache",
    "FORMAT_NAME",
    "SD_SCALING_FACTOR",
]
