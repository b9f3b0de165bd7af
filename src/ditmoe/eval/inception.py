"""InceptionV3 with the standard FID weights, through torch-fidelity, from a local file.

The network is torch-fidelity's `FeatureExtractorInceptionV3`: the 2015-12-05 TensorFlow
Inception graph that the FID, sFID and IS reference code (TTUR, ADM's evaluation suite) uses,
ported to PyTorch with TensorFlow-exact bilinear resizing to 299 px. Nothing is downloaded:
the weights come from, in order, the `weights_path` argument, ``$DITMOE_INCEPTION_WEIGHTS``,
or ``$DITMOE_CACHE/pt_inception-2015-12-05-6726825d.pth`` (``~/.cache/ditmoe/...``).

Features (all from one forward pass):

- ``pool``    (N, 2048): ``pool_3``, for FID and precision / recall;
- ``logits``  (N, 1008): ``logits_unbiased`` (pool_3 times the softmax weights, no bias), the
  logits ADM's evaluator and torch-fidelity take the Inception Score from;
- ``spatial`` (N, 2023): sFID features, ADM's ``mixed_6/conv:0[..., :7]`` flattened. torch-fidelity
  does not list them among its features, so they are read with a forward hook on the module
  that holds the same weights: the TF graph's ``mixed_6`` is ``Mixed_6d`` (mixed, mixed_1,
  mixed_2 = 5b-5d; mixed_3 = 6a; mixed_4 to mixed_6 = 6b-6d) and ``mixed_6/conv`` is that
  block's 1x1 branch, conv + batchnorm + ReLU, i.e. ``Mixed_6d.branch1x1``: (N, 192, 17, 17),
  of which the first 7 channels are kept, flattened in TF's (H, W, C) order. Set
  ``spatial=False`` to skip them.

torch-fidelity imports torchvision in its package ``__init__`` (for its CLIP / VGG / DINOv2
extractors), and no torchvision build runs beside the CPU torch these machines use. The
InceptionV3 module itself needs only torch, so `import_torch_fidelity_inception` falls back to
loading it without running that ``__init__`` (see there).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from .features import FeatureExtractor, cache_dir

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "InceptionV3Extractor",
    "import_torch_fidelity_inception",
    "resolve_inception_weights",
]

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                         + INCEPTION_WEIGHTS_FILE)
_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its hash's prefix
SFID_CHANNELS = 7


def default_inception_weights_path() -> Path:
    return cache_dir() / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(weights_path: Union[str, Path, None] = None) -> Path:
    """The local InceptionV3 weights file; FileNotFoundError (with where to get it) when absent."""
    if weights_path is not None:
        path, source = Path(weights_path).expanduser(), "the weights_path argument"
    elif os.environ.get("DITMOE_INCEPTION_WEIGHTS"):
        path, source = Path(os.environ["DITMOE_INCEPTION_WEIGHTS"]).expanduser(), "$DITMOE_INCEPTION_WEIGHTS"
    else:
        path, source = default_inception_weights_path(), "the default cache location"
    if not path.is_file():
        raise FileNotFoundError(
            f"InceptionV3 FID weights {INCEPTION_WEIGHTS_FILE} not found at {path} (from {source}). "
            f"This machine does not download them. On a machine with internet, get the pytorch-fid / "
            f"torch-fidelity release asset {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL}; "
            f"torch-fidelity publishes the same weights as weights-inception-2015-12-05-6726825d.pth), "
            f"copy it to {default_inception_weights_path()} or point DITMOE_INCEPTION_WEIGHTS at it.")
    return path


def import_torch_fidelity_inception() -> type:
    """torch-fidelity's `FeatureExtractorInceptionV3` class, importable without torchvision.

    A normal import is tried first. If it fails only because torchvision is missing (the package
    ``__init__`` imports the CLIP / VGG / DINOv2 extractors eagerly), a bare package object for
    ``torch_fidelity`` is put in `sys.modules` that skips that ``__init__``, and the submodules
    the InceptionV3 needs (feature_extractor_base, helpers, interpolate_compat_tensorflow: torch
    only) are imported through it. In such a process ``import torch_fidelity`` then gives that
    bare package, whose top-level names (``calculate_metrics`` ...) are absent; they could not
    have been imported there anyway. torchmetrics' FID imports the same submodules, so calling
    this first makes torchmetrics usable too.
    """
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("torchvision"):
            raise ModuleNotFoundError(
                "InceptionV3 features need torch-fidelity: `pip install --no-deps torch-fidelity` "
                "(--no-deps keeps pip from replacing the CPU torch build to satisfy torchvision)",
                name=e.name) from e
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("torch-fidelity is not installed", name="torch_fidelity")
    pkg = types.ModuleType("torch_fidelity", "torch-fidelity, loaded without its __init__ (no torchvision)")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    pkg.__package__ = "torch_fidelity"
    sys.modules["torch_fidelity"] = pkg
    return importlib.import_module(name).FeatureExtractorInceptionV3


def _check_hash(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(_SHA256_PREFIX):
        warnings.warn(f"{path}: sha256 {h.hexdigest()[:8]}... does not start with {_SHA256_PREFIX}; "
                      f"these are not the standard FID InceptionV3 weights, numbers will not be "
                      f"comparable with published ones", RuntimeWarning)


class InceptionV3Extractor(FeatureExtractor):
    """FID / sFID / IS features of the standard InceptionV3 (see the module docstring).

    Takes uint8 images of any size (resized to 299 inside, as the reference code does); grey
    images are repeated to 3 channels.
    """

    name = "inception-v3-fid (torch-fidelity)"
    has_logits = True

    def __init__(self, weights_path: Union[str, Path, None] = None, spatial: bool = True,
                 batch_size: int = 50, device: Union[str, torch.device] = "cpu",
                 check_hash: bool = True) -> None:
        super().__init__(batch_size=batch_size, device=device)
        path = resolve_inception_weights(weights_path)
        if check_hash:
            _check_hash(path)
        cls = import_torch_fidelity_inception()
        self.net = cls("inception-v3-compat", ["2048", "logits_unbiased"],
                       feature_extractor_weights_path=str(path)).to(self.device).eval()
        self.weights_path = path
        self.has_spatial = spatial
        self._spatial: Optional[torch.Tensor] = None
        if spatial:
            self.net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # (N, 192, 17, 17) -> first 7 channels in TF's NHWC order -> (N, 17 * 17 * 7 = 2023)
        self._spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self._spatial = None
        pool, logits = self.net(images.contiguous())
        out = {"pool": pool, "logits": logits}
        if self.has_spatial:
            out["spatial"] = self._spatial
        return out
