"""A small MNIST classifier used as the feature extractor for MNIST samples.

Inception features mean little on 28 px grey digits, so MNIST samples are judged with this
network instead: its penultimate layer gives "MNIST-FID" features, its logits the class
agreement (does the digit match the label it was sampled for?) and an MNIST Inception Score.

Input: (N, 1, 32, 32) in [-1, 1], i.e. the 28 px digit padded by 2 px of background, the
layout the diffusion models train on. Train it once (about a minute or two on 2 cores) with

    python -m ditmoe.eval.mnist_classifier            # -> $DITMOE_CACHE/mnist_classifier.safetensors

and every later evaluation loads the cached weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureExtractor, cache_dir

__all__ = [
    "MNISTClassifier",
    "MNISTClassifierExtractor",
    "default_classifier_path",
    "ensure_mnist_classifier",
    "load_mnist",
    "load_mnist_classifier",
    "mnist_to_input",
    "train_mnist_classifier",
]

CLASSIFIER_FILE = "mnist_classifier.safetensors"


def default_classifier_path() -> Path:
    return cache_dir() / CLASSIFIER_FILE


# ----------------------------------------------------------------------------- data

def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST as uint8 (N, 28, 28) and int64 labels: "train" (the standard 60,000) or "test" (10,000).

    Thin wrapper over `ditmoe.data.mnist.load_mnist`, the project's one MNIST reader.
    """
    from ..data.mnist import load_mnist as _load

    return _load(split)


def mnist_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, H, W) with H in (28, 32) -> float (N, 1, 32, 32) in [-1, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[1] != 1:
        raise ValueError(f"the MNIST classifier takes 1-channel images, got {tuple(images.shape)}")
    x = images.float() / 127.5 - 1.0
    if x.shape[-1] == 28 and x.shape[-2] == 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # background is black = -1
    elif x.shape[-1] != 32 or x.shape[-2] != 32:
        raise ValueError(f"the MNIST classifier takes 28 or 32 px images, got {tuple(images.shape)}")
    return x


# ----------------------------------------------------------------------------- model

class MNISTClassifier(nn.Module):
    """Three stride-2 conv-BN-ReLU layers and a 128-d feature layer: (N, 1, 32, 32) -> logits (N, 10).

    Strided convs instead of conv + max-pool: on CPU the full-resolution activations and the
    pooling, not the FLOPs, dominated a training step (a conv + max-pool net was about 10x
    slower per step, measured on 2 shared cores).
    BatchNorm makes the few hundred steps of a 2 to 3 epoch run enough for >= 99%.
    """

    feature_dim = 128

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 5, stride=2, padding=2, bias=False)          # -> (N, w, 16, 16)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)      # -> (N, 2w, 8, 8)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False)  # -> (N, 4w, 4, 4)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.fc1 = nn.Linear(4 * w * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, num_classes)
        self.dropout = nn.Dropout(0.25)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 32, 32) -> (N, 128)
        """The penultimate layer before its ReLU: the MNIST-FID features.

        Pre-activation, because a ReLU leaves some units at exactly 0 for every digit, which makes
        the feature covariance singular and FID's matrix square root inaccurate.
        """
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc1(self.dropout(x.flatten(1)))

    def head(self, features: torch.Tensor) -> torch.Tensor:  # (N, 128) -> logits (N, 10)
        return self.fc2(self.dropout(F.relu(features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def ensure_mnist_classifier(path: Union[str, Path, None] = None) -> Path:
    """The cached MNIST evaluation classifier's path, training it first (once) where it is missing;
    its test accuracy is printed."""
    path = Path(path) if path else default_classifier_path()
    if not path.is_file():
        print(f"training the MNIST evaluation classifier once (cached at {path})")
        train_mnist_classifier(path)
    return path


def load_mnist_classifier(path: Union[str, Path, None] = None,
                          device: Union[str, torch.device] = "cpu") -> MNISTClassifier:
    """Load cached weights (default `default_classifier_path()`), in eval mode."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = Path(path) if path is not None else default_classifier_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST classifier weights {path.name} not found at {path}. Train them once with "
            f"`python -m ditmoe.eval.mnist_classifier --out {path}` (about 2 minutes on 2 CPU cores), "
            f"or set DITMOE_CACHE to the folder that holds them.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = MNISTClassifier(width=int(meta.get("width", 32)))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


class MNISTClassifierExtractor(FeatureExtractor):
    """Penultimate 128-d features ("pool", before the ReLU) and logits of the MNIST classifier."""

    name = "mnist-cnn"
    has_logits = True

    def __init__(self, model: Union[MNISTClassifier, str, Path, None] = None,
                 batch_size: int = 500, device: Union[str, torch.device] = "cpu") -> None:
        super().__init__(batch_size=batch_size, device=device)
        if not isinstance(model, nn.Module):
            model = load_mnist_classifier(model, device=self.device)
        self.model = model.to(self.device).eval()

    @property
    def num_classes(self) -> int:
        """How many classes the classifier predicts (labels 0..num_classes - 1)."""
        return self.model.fc2.out_features

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.model.features(mnist_to_input(images))
        return {"pool": feats, "logits": self.model.head(feats)}


# ----------------------------------------------------------------------------- training

@torch.inference_mode()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(x), batch_size):
        correct += (model(mnist_to_input(x[s:s + batch_size])).argmax(1) == y[s:s + batch_size]).sum().item()
    return correct / max(len(x), 1)


def train_mnist_classifier(out_path: Union[str, Path, None] = None, epochs: int = 3,
                           batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                           limit: Optional[int] = None, eval_limit: Optional[int] = None,
                           bf16: bool = False, verbose: bool = True) -> dict:
    """Train the classifier on the 60,000 MNIST training images and save it as safetensors.

    The test accuracy is measured on the 10,000 test images (the first `eval_limit` of them).

    `limit` / `eval_limit` cut the train / test sets (for quick tests). Returns a dict with
    ``test_accuracy``, ``seconds`` (training wall time), ``path``, the settings used and
    ``model`` (the trained network, in eval mode); all but the model also go into the file's
    metadata under "info".
    """
    from safetensors.torch import save_file

    out_path = Path(out_path) if out_path is not None else default_classifier_path()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    if limit is not None:
        xtr, ytr = xtr[:limit], ytr[:limit]
    if eval_limit is not None:
        xte, yte = xte[:eval_limit], yte[:eval_limit]
    xtr, ytr = torch.from_numpy(xtr).unsqueeze(1), torch.from_numpy(ytr)
    xte, yte = torch.from_numpy(xte).unsqueeze(1), torch.from_numpy(yte)
    xtr_f = mnist_to_input(xtr)  # preprocess once: (N, 1, 32, 32)

    model = MNISTClassifier()
    steps_per_epoch = (len(xtr_f) + batch_size - 1) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr_f), generator=g)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xtr_f[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}: train loss {running / steps_per_epoch:.4f} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    seconds = time.perf_counter() - t0
    acc = _accuracy(model, xte, yte)
    info = {"test_accuracy": acc, "seconds": seconds, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "seed": seed, "train_images": len(xtr_f), "test_images": len(xte), "bf16": bf16}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    meta = {"width": "32", "info": json.dumps(info)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, out_path)  # atomic: a half-written cache file never exists
    info["path"] = str(out_path)
    info["model"] = model.eval()
    if verbose:
        print(f"test accuracy {acc * 100:.2f}% on {len(xte)} images; trained in {seconds:.1f}s; "
              f"saved {out_path}", flush=True)
    return info


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Train and cache the MNIST evaluation classifier.")
    p.add_argument("--out", default=None, help=f"output .safetensors (default {default_classifier_path()})")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (no clear gain measured on 2 shared cores; fp32 is the default)")
    a = p.parse_args(argv)
    train_mnist_classifier(a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, bf16=a.bf16)


if __name__ == "__main__":
    main()
