"""Front door: `evaluate(samples, ref)` computes every metric the extractor supports.

    from ditmoe.eval import evaluate
    r = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz")   # Inception
    r = evaluate(mnist_samples, mnist_reference, labels=y)             # MNIST classifier
    print(format_results(r))

Every result carries the name of the extractor its numbers come from: an FID measured with
the MNIST classifier is not comparable with an Inception FID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .features import FeatureExtractor, ImageBatch, extractor_digest, to_uint8_nhwc
from .metrics import feature_statistics, frechet_distance, inception_score, manifold_radii, precision_recall
from .npz import load_reference_stats, load_samples_npz, save_reference_stats

__all__ = ["check_reference_fits", "compute_reference_stats", "evaluate", "format_results", "get_extractor",
           "is_mnist_like"]

PathLike = Union[str, Path]
Source = Union[PathLike, ImageBatch]


def is_mnist_like(images: np.ndarray) -> bool:
    """1-channel 28 or 32 px square images (uint8 NHWC)."""
    return images.ndim == 4 and images.shape[-1] == 1 and images.shape[1] == images.shape[2] in (28, 32)


def get_extractor(extractor: Union[str, FeatureExtractor] = "auto", images: Optional[np.ndarray] = None,
                  *, device: str = "cpu", batch_size: Optional[int] = None,
                  mnist_classifier_path: Optional[PathLike] = None,
                  inception_weights: Optional[PathLike] = None) -> FeatureExtractor:
    """Resolve "auto" | "mnist" | "inception" (or pass a `FeatureExtractor` through).

    "auto" picks the MNIST classifier for 1-channel 28 / 32 px images and InceptionV3 otherwise.
    """
    if isinstance(extractor, FeatureExtractor):
        return extractor
    if extractor == "auto":
        if images is None:
            raise ValueError('extractor="auto" needs the images to choose from')
        extractor = "mnist" if is_mnist_like(images) else "inception"
    kw: dict[str, Any] = {"device": device}
    if batch_size is not None:
        kw["batch_size"] = batch_size
    if extractor == "mnist":
        from .mnist_classifier import MNISTClassifierExtractor

        return MNISTClassifierExtractor(mnist_classifier_path, **kw)
    if extractor == "inception":
        from .inception import InceptionV3Extractor

        return InceptionV3Extractor(inception_weights, **kw)
    raise ValueError(f'unknown extractor {extractor!r}: use "auto", "mnist", "inception" or a FeatureExtractor')


def _load_images(source: Source) -> tuple[np.ndarray, Optional[np.ndarray]]:
    if isinstance(source, (str, Path)):
        return load_samples_npz(source)
    return to_uint8_nhwc(source), None


def _stats_from_features(feats: dict[str, np.ndarray], name: str, k: int) -> dict[str, Any]:
    mu, sigma = feature_statistics(feats["pool"])
    out: dict[str, Any] = {"extractor": name, "mu": mu, "sigma": sigma, "features": feats["pool"],
                           "num_images": len(feats["pool"])}
    if "spatial" in feats:
        out["mu_s"], out["sigma_s"] = feature_statistics(feats["spatial"])
    if len(feats["pool"]) > k:
        out["radii"] = manifold_radii(feats["pool"], k)
    return out


def compute_reference_stats(ref: Source, extractor: Union[str, FeatureExtractor] = "auto",
                            out: Optional[PathLike] = None, k: int = 3, progress: bool = False,
                            **extractor_kw: Any) -> dict[str, Any]:
    """Statistics (mu, sigma, mu_s, sigma_s), pool features and k-NN radii of reference images.

    With `out`, they are cached as a `.npz` that `evaluate` accepts as `ref`.
    """
    images, _ = _load_images(ref)
    ext = get_extractor(extractor, images, **extractor_kw)
    stats = _stats_from_features(ext(images, progress=progress), ext.name, k)
    if out is not None:
        save_reference_stats(out, stats["mu"], stats["sigma"], extractor=ext.name, mu_s=stats.get("mu_s"),
                             sigma_s=stats.get("sigma_s"), features=stats["features"],
                             radii=stats.get("radii"), num_images=stats["num_images"])
    return stats


def check_reference_fits(ref: PathLike, stored: dict[str, Any], ext: FeatureExtractor,
                         sample_size: Optional[int] = None) -> None:
    """Refuse statistics that record another extractor (name or weights digest) than `ext`, or
    images of another size than the samples' (28 and 32 px count as one for the MNIST classifier,
    which pads 28 to 32)."""
    if stored.get("extractor_digest") is not None:
        digest = extractor_digest(ext)
        if stored["extractor"] != ext.name or stored["extractor_digest"] != digest:
            raise ValueError(
                f"{ref}: the reference statistics were made with extractor {stored['extractor']!r} (weights digest "
                f"{stored['extractor_digest']}), but the samples are measured with {ext.name!r} (weights digest "
                f"{digest}); FIDs from different networks are not comparable. Rebuild the reference with the "
                f"samples' extractor (ditmoe ref --data {stored.get('source') or 'DATA'} --extractor ...), or "
                "evaluate with the extractor the reference was made with (--extractor)")
    size = stored.get("image_size")
    if size is not None and sample_size is not None and size != sample_size:
        from .mnist_classifier import MNISTClassifierExtractor

        if not (isinstance(ext, MNISTClassifierExtractor) and {size, sample_size} <= {28, 32}):
            raise ValueError(f"{ref}: the reference images are {size}x{size} px, the samples {sample_size}x"
                             f"{sample_size}; rebuild the reference at the samples' size (ditmoe ref --image-size "
                             f"{sample_size})")


def _reference(ref: Source, ext: FeatureExtractor, k: int, progress: bool,
               sample_size: Optional[int] = None) -> dict[str, Any]:
    """Reference statistics for `ext`: read from a cache when it was made with `ext`, else computed."""
    if not isinstance(ref, (str, Path)):
        return _stats_from_features(ext(to_uint8_nhwc(ref), progress=progress), ext.name, k)
    stored = load_reference_stats(ref)
    check_reference_fits(ref, stored, ext, sample_size)
    from .inception import InceptionV3Extractor

    # ADM reference batches record no extractor: their statistics come from the TF Inception
    # graph, which our InceptionV3 reproduces, and cover the whole reference set while arr_0
    # holds only a subset, so their mu / sigma are the ones to use (as ADM's evaluator does).
    same = stored["extractor"] == ext.name or (stored["extractor"] is None and isinstance(ext, InceptionV3Extractor))
    if same and "mu" in stored:
        out = {key: stored[key] for key in ("mu", "sigma", "mu_s", "sigma_s", "features", "radii", "num_images")
               if key in stored}
        out["extractor"] = ext.name
        if "features" not in out and stored["has_images"]:  # precision / recall need features
            feats = ext(load_reference_stats(ref, load_images=True)["images"], progress=progress)
            out["features"] = feats["pool"]
            out.setdefault("num_images", len(feats["pool"]))
        if "features" in out and "radii" not in out and len(out["features"]) > k:
            out["radii"] = manifold_radii(out["features"], k)
        return out
    if stored["has_images"]:
        return _reference(load_reference_stats(ref, load_images=True)["images"], ext, k, progress)
    raise ValueError(f"{ref}: statistics were computed with extractor {stored['extractor']!r}, not "
                     f"{ext.name!r}, and the file holds no images to recompute them from; rebuild them with the "
                     "samples' extractor (ditmoe ref --extractor ...)")


def evaluate(samples: Source, ref: Source, extractor: Union[str, FeatureExtractor] = "auto",
             labels: Optional[Any] = None, *, is_splits: int = 10, k: int = 3,
             device: str = "cpu", batch_size: Optional[int] = None, progress: bool = False,
             mnist_classifier_path: Optional[PathLike] = None,
             inception_weights: Optional[PathLike] = None) -> dict[str, Any]:
    """Evaluate samples against a reference.

    samples: an ADM-style `.npz` path (``arr_0`` images, ``arr_1`` labels if present) or images
    (uint8 NHWC, or float NCHW in [-1, 1]). ref: the same, or a statistics cache from
    `compute_reference_stats` / an ADM reference batch. labels: the class each sample was asked
    for (default: the file's ``arr_1``); only the MNIST classifier can judge them.

    Returns a dict: ``extractor`` (name), ``num_samples``, ``num_ref``, ``fid``, ``sfid``,
    ``inception_score`` / ``inception_score_std`` (over `is_splits` chunks), ``precision``,
    ``recall`` (k-NN manifolds), ``class_agreement``; a metric the extractor or the inputs
    cannot give is None.
    """
    images, file_labels = _load_images(samples)
    if labels is None:
        labels = file_labels
    if len(images) < 2:
        raise ValueError(f"{len(images)} sample image(s): FID and the other metrics need at least 2 (thousands "
                         "for numbers worth comparing)")
    ext = get_extractor(extractor, images, device=device, batch_size=batch_size,
                        mnist_classifier_path=mnist_classifier_path, inception_weights=inception_weights)
    from .mnist_classifier import MNISTClassifierExtractor

    lab = None
    if labels is not None and isinstance(ext, MNISTClassifierExtractor):
        # Checked before any feature is computed: a label the classifier cannot predict would
        # only lower the class agreement silently.
        lab = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).astype(np.int64).reshape(-1)
        if len(lab) != len(images):
            raise ValueError(f"{len(lab)} labels for {len(images)} samples")
        num_classes = ext.num_classes
        bad = lab[(lab < 0) | (lab >= num_classes)]
        if len(bad):
            raise ValueError(f"{len(bad)} label(s) outside the classifier's classes 0..{num_classes - 1} "
                             f"(e.g. {sorted(set(bad.tolist()))[:5]}): the labels (arr_1) must be the class each "
                             "sample was asked for")
    feats = ext(images, progress=progress)
    refs = _reference(ref, ext, k, progress, sample_size=images.shape[1])

    result: dict[str, Any] = {"extractor": ext.name, "num_samples": len(images),
                              "num_ref": refs.get("num_images"), "fid": None, "sfid": None,
                              "inception_score": None, "inception_score_std": None,
                              "precision": None, "recall": None, "class_agreement": None}
    mu, sigma = feature_statistics(feats["pool"])
    result["fid"] = frechet_distance(mu, sigma, refs["mu"], refs["sigma"])
    if "spatial" in feats and "mu_s" in refs:
        result["sfid"] = frechet_distance(*feature_statistics(feats["spatial"]), refs["mu_s"], refs["sigma_s"])
    if "logits" in feats:
        result["inception_score"], result["inception_score_std"] = inception_score(
            feats["logits"], splits=is_splits, from_logits=True)
    if "features" in refs and len(feats["pool"]) > k and len(refs["features"]) > k:
        result["precision"], result["recall"] = precision_recall(refs["features"], feats["pool"], k=k,
                                                                 real_radii=refs.get("radii"))
    if lab is not None:
        result["class_agreement"] = float((feats["logits"].argmax(1) == lab).mean())
    return result


def format_results(result: dict[str, Any]) -> str:
    """One line per metric, each tagged with the extractor it was measured with."""
    lines = [f"extractor: {result['extractor']}  (samples {result['num_samples']}, reference {result['num_ref']})"]
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "class_agreement"):
        v = result.get(key)
        if v is None:
            continue
        extra = f" ± {result['inception_score_std']:.4f}" if key == "inception_score" else ""
        lines.append(f"{key:>16}: {v:.4f}{extra}")
    return "\n".join(lines)
