"""Sample-quality metrics on classifier outputs and features (pure numpy/scipy).

* ``class_accuracy``: how often class-conditional samples are recognised as
  the class they were conditioned on.
* ``frechet_distance``: the FID/FVD statistic between two feature sets, each
  summarised by a Gaussian (mean and covariance).
* ``precision_recall``: k-NN manifold precision (fidelity) and recall
  (coverage) of Kynkaanniemi et al., 2019, "Improved Precision and Recall
  Metric for Assessing Generative Models".

Features are ``[N, F]`` arrays, e.g. ``vidit.eval.classifier.features(...)[0]``.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.spatial.distance


def class_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``pred`` equal to ``labels`` (both integer ``[N]``)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred {pred.shape} and labels {labels.shape} differ in shape")
    if pred.size == 0:
        raise ValueError("class_accuracy of an empty set is undefined")
    return float(np.mean(pred == labels))


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list:
    """Class accuracy of each class k's samples (None for a class with no samples): which
    digits a model gets wrong, where the overall accuracy only says how many."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred {pred.shape} and labels {labels.shape} differ in shape")
    return [float(np.mean(pred[labels == k] == k)) if np.any(labels == k) else None
            for k in range(num_classes)]


def top_confusions(pred: np.ndarray, labels: np.ndarray, top: int = 5) -> list:
    """The `top` most frequent (label, predicted, count) mistakes, most frequent first."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    wrong = pred != labels
    pairs, counts = np.unique(np.stack([labels[wrong], pred[wrong]], axis=1), axis=0,
                              return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]  # ties: by label, then pred
    return [(int(pairs[i, 0]), int(pairs[i, 1]), int(counts[i])) for i in order]


def frame_agreement(frame_pred: np.ndarray, video_pred: np.ndarray) -> float:
    """Share of frames [N, T] classified as their video's class [N]: 1.0 when every sample
    keeps one digit identity across its frames (a temporal consistency check)."""
    frame_pred, video_pred = np.asarray(frame_pred), np.asarray(video_pred)
    if frame_pred.ndim != 2 or frame_pred.shape[0] != video_pred.shape[0]:
        raise ValueError(f"frame predictions {frame_pred.shape} do not match videos "
                         f"{video_pred.shape}")
    return float((frame_pred == video_pred[:, None]).mean())


def _as_features(feats: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)  # float64: covariances of ~100 dims lose digits in float32
    if feats.ndim != 2:
        raise ValueError(f"{name} must be [N, F], got shape {feats.shape}")
    if len(feats) < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {len(feats)}")
    return feats


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` of ``[N, F]`` features."""
    feats = _as_features(feats, "feats", 2)
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two Gaussians have different dimensions")

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than dims, dead features): nudge both
        # covariances off singularity, as the reference FID code does.
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # sqrtm of a product of PSD matrices is real in exact arithmetic; a tiny
        # imaginary part is round-off, a large one means something is broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component: {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real

    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(max(distance, 0.0))  # round-off can push identical sets just below zero


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to ``[N, F]`` and ``[M, F]`` features."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b), eps=eps)


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(a), len(b)]``.

    cdist computes each difference directly, so identical points are exactly 0
    apart (the |a|^2 - 2ab + |b|^2 expansion is not), which keeps duplicates
    inside each other's balls.
    """
    return scipy.spatial.distance.cdist(a, b)


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour within the same set."""
    d = _pairwise_distances(feats, feats)
    # Column 0 of each sorted row is the point itself (distance 0), so the k-th
    # neighbour sits at column k.
    return np.partition(d, k, axis=1)[:, k]


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of ``queries`` inside at least one ball (manifold point, radius)."""
    d = _pairwise_distances(queries, manifold)
    return float(np.mean((d <= radii[None, :]).any(axis=1)))


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019).

    Each set's manifold is approximated by balls around its points with radius
    the distance to the k-th nearest neighbour in the same set. Precision is the
    fraction of fake samples inside the real manifold (are samples realistic?);
    recall is the fraction of real samples inside the fake manifold (is the
    real distribution covered?). Memory is O(N * M) for the distance matrices,
    fine for the few thousand samples evaluation uses.
    """
    real = _as_features(real_feats, "real_feats", k + 1)
    fake = _as_features(fake_feats, "fake_feats", k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    precision = _coverage(real, _knn_radii(real, k), fake)
    recall = _coverage(fake, _knn_radii(fake, k), real)
    return precision, recall
