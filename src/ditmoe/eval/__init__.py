"""Evaluation: feature extractors, FID / sFID / IS / precision-recall, ADM-style `.npz` files.

- `evaluate(samples, ref, extractor="auto", labels=None)`: the front door (evaluate.py)
- metrics.py: `frechet_distance`, `inception_score`, `precision_recall` on features
- features.py: the `FeatureExtractor` interface; inception.py: InceptionV3 (torch-fidelity,
  local weights); mnist_classifier.py: the MNIST classifier and its training
- npz.py: sample batches (``arr_0`` / ``arr_1``) and reference statistics caches
- reference.py: reference statistics of any image folder or built-in set, and their cache

torch-fidelity is imported only when an InceptionV3 is built. The names of inception.py and
mnist_classifier.py load on first use, so that ``python -m ditmoe.eval.mnist_classifier`` runs
its module once.
"""

from __future__ import annotations

# The function `evaluate` shadows the submodule of the same name on purpose: importing it here,
# eagerly, keeps `ditmoe.eval.evaluate` the function whatever gets imported later.
from .evaluate import compute_reference_stats, evaluate, format_results, get_extractor
from .features import FeatureExtractor, ModuleFeatureExtractor, to_uint8_nhwc
from .metrics import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from .npz import load_reference_stats, load_samples_npz, save_reference_stats, save_samples_npz
from .reference import build_reference, cached_reference, extractor_digest, load_reference_images

_LAZY = {
    "InceptionV3Extractor": "inception", "resolve_inception_weights": "inception",
    "MNISTClassifier": "mnist_classifier", "MNISTClassifierExtractor": "mnist_classifier",
    "load_mnist_classifier": "mnist_classifier", "train_mnist_classifier": "mnist_classifier",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FeatureExtractor",
    "InceptionV3Extractor",
    "MNISTClassifier",
    "MNISTClassifierExtractor",
    "ModuleFeatureExtractor",
    "build_reference",
    "cached_reference",
    "compute_reference_stats",
    "evaluate",
    "extractor_digest",
    "feature_statistics",
    "fid_from_features",
    "format_results",
    "frechet_distance",
    "get_extractor",
    "inception_score",
    "load_mnist_classifier",
    "load_reference_images",
    "load_reference_stats",
    "load_samples_npz",
    "manifold_radii",
    "precision_recall",
    "resolve_inception_weights",
    "save_reference_stats",
    "save_samples_npz",
    "to_uint8_nhwc",
    "train_mnist_classifier",
]
