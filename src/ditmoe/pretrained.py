"""Model folders: `save_pretrained(model, folder)` / `from_pretrained(folder)`, for every model.

A folder holds

- ``config.json``: the model's `ModelConfig` fields, plus ``format`` ("ditmoe-pretrained"),
  ``format_version``, ``ditmoe_version`` and, when known, ``process`` ("flow" / "ddpm") and
  ``weights`` (which weights of a run these are, e.g. "ema");
- ``model.safetensors``: the state dict in this package's layout, its metadata carrying the same
  config, so the file alone also loads (`ditmoe.convert.load_model`).

Dense and DiT-MoE models alike; diffusers' `DiTTransformer2DModel` folders (dense DiT only) are
read too, through `ditmoe.export.from_diffusers`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT = "ditmoe-pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_FOLDER_KEYS = ("format", "format_version", "ditmoe_version", "process", "weights")


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); a model folder's config.json must be the JSON that "
                         "ditmoe.save_pretrained or diffusers' save_pretrained wrote") from e
    return data if isinstance(data, dict) else None


def _folder_config(path: str | os.PathLike) -> dict:
    """The config.json mapping of a folder, or {} (not a folder, no or unreadable config.json)."""
    path = Path(path)
    if not path.is_dir():
        return {}
    try:
        return _read_config(path) or {}
    except ValueError:
        return {}


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """A folder written by `save_pretrained` (its config.json says format "ditmoe-pretrained")."""
    return _folder_config(path).get("format") == FORMAT


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A diffusers DiTTransformer2DModel folder (config.json with that `_class_name`)."""
    return _folder_config(path).get("_class_name") == "DiTTransformer2DModel"


def save_pretrained(model, folder: str | os.PathLike, process: str | None = None,
                    weights: str | None = None) -> Path:
    """Write `model` (dense DiT or DiT-MoE) as FOLDER/config.json + FOLDER/model.safetensors.

    `process` ("flow" / "ddpm") and `weights` ("ema", "model", ...) are recorded when given, so
    that `ditmoe sample --ckpt FOLDER` samples with the right process. Files are written
    atomically; other files in the folder are left alone.
    """
    from safetensors.torch import save_file

    from . import __version__
    from .weights_io import atomic_write, check_output_dir

    if process not in (None, "flow", "ddpm"):
        raise ValueError(f"process must be 'flow', 'ddpm' or None, got {process!r}")
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "state_dict"):
        raise TypeError(f"save_pretrained takes a ditmoe model (with .config), got {type(model).__name__}")
    folder = check_output_dir(folder, "folder")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "ditmoe", "config": cfg.to_json()}
    if process:
        meta["process"] = process
    if weights:
        meta["weights"] = weights
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "ditmoe_version": __version__,
              **({"process": process} if process else {}), **({"weights": weights} if weights else {}),
              **cfg.to_dict()}
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def _folder_hint(folder: Path) -> str:
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return f"it holds {', '.join(files[:8]) + (' ...' if len(files) > 8 else '') if files else 'nothing'}"


def load_pretrained_and_info(folder: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """The model of a model folder (eval mode) and {"weights", "process"?} as `load_model_and_info` gives.

    Reads folders written by `save_pretrained` and diffusers DiTTransformer2DModel folders.
    """
    from .config import ModelConfig
    from .weights_io import load_into, official_to_package, read_safetensors
    from .registry import create_model

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist" if not folder.exists()
                                else f"{folder} is a file, not a model folder")
    cfg_dict = _read_config(folder)
    if cfg_dict is None:
        raise ValueError(f"{folder} has no {CONFIG_FILE}, so it is not a model folder ({_folder_hint(folder)}); "
                         "pass a folder written by ditmoe.save_pretrained / `ditmoe convert --to folder`, a diffusers "
                         "DiTTransformer2DModel folder, or a checkpoint file")
    if cfg_dict.get("_class_name") == "DiTTransformer2DModel":
        from .export import from_diffusers

        return from_diffusers(folder, with_info=True)
    if cfg_dict.get("format") != FORMAT:
        what = (f"a diffusers {cfg_dict['_class_name']}" if "_class_name" in cfg_dict
                else "not a ditmoe model folder (no \"format\": \"ditmoe-pretrained\")")
        raise ValueError(f"{folder / CONFIG_FILE} describes {what}; ditmoe reads folders written by "
                         "ditmoe.save_pretrained and diffusers DiTTransformer2DModel folders (dense DiT)")
    version = cfg_dict.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE} has format_version {version!r}; this ditmoe reads version "
                         f"{FORMAT_VERSION} or older: upgrade ditmoe to load it")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} has a ditmoe config.json but no {WEIGHTS_FILE} ({_folder_hint(folder)})")
    model_cfg = ModelConfig.from_dict({k: v for k, v in cfg_dict.items() if k not in _FOLDER_KEYS}).validate()
    sd, meta = read_safetensors(weights_path)
    model = create_model(model_cfg)
    try:
        load_into(model, official_to_package(sd))
    except ValueError as e:
        raise type(e)(f"{weights_path} does not fit {folder / CONFIG_FILE}: {e}") from e
    info = {"weights": str(cfg_dict.get("weights") or meta.get("weights") or "file")}
    process = cfg_dict.get("process") or meta.get("process")
    if process in ("flow", "ddpm"):
        info["process"] = process
    return model.eval(), info


def from_pretrained(folder: str | os.PathLike, device: str | None = None):
    """Load a model folder (`save_pretrained`'s, or a diffusers DiTTransformer2DModel's) in eval mode."""
    model = load_pretrained_and_info(folder)[0]
    return model.to(device) if device is not None else model


__all__ = ["from_pretrained", "is_diffusers_folder", "is_pretrained_folder", "load_pretrained_and_info",
           "save_pretrained"]
