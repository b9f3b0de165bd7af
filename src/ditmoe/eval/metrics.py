"""Sample-quality metrics computed from features: FID / sFID, Inception Score, precision / recall.

All functions take numpy arrays (or anything `np.asarray` accepts) and return Python floats.
They know nothing of the network that produced the features: report each number next to the
name of its extractor (`FeatureExtractor.name`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from scipy import linalg

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "inception_score",
    "manifold_radii",
    "precision_recall",
]


# ----------------------------------------------------------------------------- FID

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, F), got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, in float64 with
    `scipy.linalg.sqrtm`. When the product is singular enough that sqrtm returns non-finite
    values, `eps` is added to both diagonals (the usual fallback of the reference FID code).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2

    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sigma1 @ sigma2 is singular; adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        # tiny imaginary parts are round-off; large ones mean the inputs are not covariances
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (N1, F) and (N2, F)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# ----------------------------------------------------------------------------- Inception Score

def inception_score(probs: np.ndarray, splits: int = 10, from_logits: bool = False) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` as (mean, std) over `splits` equal chunks.

    `probs` (N, K) are class probabilities, or logits with ``from_logits=True`` (softmax in
    float64). Chunk i holds samples i, i + splits, i + 2 splits, ...: for samples in random order
    (the reference evaluators' files) the same statistic as contiguous chunks, and files written
    class by class (this package's `ditmoe sample`) still get every class in every chunk, where
    contiguous chunks would hold one class each and score about 1. `splits` is capped at N.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"need (N, K) probabilities, got {p.shape}")
    if from_logits:
        p = p - p.max(axis=1, keepdims=True)
        p = np.exp(p)
        p /= p.sum(axis=1, keepdims=True)
    scores = []
    n_chunks = min(splits, len(p))
    for chunk in (p[i::n_chunks] for i in range(n_chunks)):
        py = chunk.mean(axis=0, keepdims=True)  # (1, K) marginal
        # xlogy-style: 0 * log 0 = 0, so one-hot predictions are fine
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(chunk > 0, chunk * (np.log(chunk) - np.log(py)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall

def _block_sqdist(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Na, Nb) from precomputed squared norms."""
    d = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 2048) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point (N,), float32.

    Computed block by block, keeping only the k + 1 smallest distances per row (self included,
    at distance 0), so memory stays at about block x block floats whatever N is. Distances are
    float32 like the ADM evaluation suite's: float64 GEMMs would make 50k x 50k several times
    slower for no change in which points fall inside which balls.
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    n = len(x)
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    sq = (x * x).sum(1)
    radii = torch.empty(n, dtype=torch.float32)
    for i in range(0, n, block):
        best = None  # (rows, k + 1) smallest so far
        for j in range(0, n, block):
            d = _block_sqdist(x[i:i + block], x[j:j + block], sq[i:i + block], sq[j:j + block])
            if i == j:  # the diagonal is exactly 0 mathematically; make it so numerically too
                d.fill_diagonal_(0.0)
            cand = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
            best = cand if best is None else torch.cat([best, cand], 1).topk(k + 1, dim=1, largest=False).values
        radii[i:i + block] = best[:, k]
    return radii.numpy()


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Fraction of `points` inside at least one ball (centers, squared radii)."""
    psq, csq = (points * points).sum(1), (centers * centers).sum(1)
    inside = torch.zeros(len(points), dtype=torch.bool)
    for i in range(0, len(points), block):
        hit = torch.zeros(min(block, len(points) - i), dtype=torch.bool)
        for j in range(0, len(centers), block):
            d = _block_sqdist(points[i:i + block], centers[j:j + block], psq[i:i + block], csq[j:j + block])
            hit |= (d <= radii[None, j:j + block]).any(1)
            if hit.all():
                break
        inside[i:i + block] = hit
    return float(inside.double().mean())


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     block: int = 2048, real_radii: Optional[np.ndarray] = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    Precision: fraction of fake samples inside the real manifold (the union of balls around each
    real feature reaching its k-th nearest real neighbour). Recall: fraction of real samples
    inside the fake manifold. `real_radii` (from `manifold_radii`) can be passed to reuse them.
    """
    real = torch.from_numpy(np.ascontiguousarray(real_features, dtype=np.float32))
    fake = torch.from_numpy(np.ascontiguousarray(fake_features, dtype=np.float32))
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need (N, F) features of equal F, got {tuple(real.shape)} and {tuple(fake.shape)}")
    r_real = torch.from_numpy(np.asarray(real_radii, np.float32) if real_radii is not None
                              else manifold_radii(real.numpy(), k, block))
    r_fake = torch.from_numpy(manifold_radii(fake.numpy(), k, block))
    precision = _coverage(fake, real, r_real, block)
    recall = _coverage(real, fake, r_fake, block)
    return precision, recall
