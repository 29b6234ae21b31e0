"""Evaluation metrics: detection against centre points, clustering against cell classes.

Pure functions on arrays; the definitions follow ``method.md`` section 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class DetectionScore:
    """Counts of a one-to-one matching and the figures derived from them."""

    true_positives: int
    n_predicted: int
    n_reference: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.n_predicted if self.n_predicted else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.n_reference if self.n_reference else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __add__(self, other: "DetectionScore") -> "DetectionScore":
        return DetectionScore(
            self.true_positives + other.true_positives,
            self.n_predicted + other.n_predicted,
            self.n_reference + other.n_reference,
        )

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "true_positives": self.true_positives,
            "n_predicted": self.n_predicted,
            "n_reference": self.n_reference,
        }


def match_points(predicted: np.ndarray, reference: np.ndarray, radius: float) -> np.ndarray:
    """Match two point sets one-to-one within a radius (Hungarian, minimum total distance).

    Parameters
    ----------
    predicted : ndarray, shape (N, 2), float
        Predicted points (x, y), pixels.
    reference : ndarray, shape (M, 2), float
        Reference points (x, y), same units.
    radius : float
        Largest distance of a match, same units.

    Returns
    -------
    ndarray, shape (K, 2), int
        Index pairs ``(predicted_index, reference_index)`` of the K matches.
    """
    predicted = np.asarray(predicted, dtype=float).reshape(-1, 2)
    reference = np.asarray(reference, dtype=float).reshape(-1, 2)
    if len(predicted) == 0 or len(reference) == 0:
        return np.empty((0, 2), dtype=int)
    pairs = cKDTree(predicted).query_ball_tree(cKDTree(reference), r=radius)
    rows = np.repeat(np.arange(len(pairs)), [len(p) for p in pairs])
    if rows.size == 0:
        return np.empty((0, 2), dtype=int)
    cols = np.concatenate([np.asarray(p, dtype=int) for p in pairs])
    # Only points with a candidate within the radius take part; non-edges cost more than
    # any real match so the assignment never prefers them.
    used_rows, row_index = np.unique(rows, return_inverse=True)
    used_cols, col_index = np.unique(cols, return_inverse=True)
    distance = np.hypot(*(predicted[rows] - reference[cols]).T)
    cost = np.full((len(used_rows), len(used_cols)), 1e6 + radius)
    cost[row_index, col_index] = distance
    r, c = linear_sum_assignment(cost)
    keep = cost[r, c] <= radius
    return np.stack([used_rows[r[keep]], used_cols[c[keep]]], axis=1)


def detection_score(predicted: np.ndarray, reference: np.ndarray, radius: float) -> DetectionScore:
    """Precision / recall / F1 of predicted centroids against reference points.

    See :func:`match_points` for the arguments.
    """
    matches = match_points(predicted, reference, radius)
    return DetectionScore(len(matches), len(np.reshape(predicted, (-1, 2))),
                          len(np.reshape(reference, (-1, 2))))


@dataclass(frozen=True)
class ClusteringScore:
    """Purity, entropy (nats; lower is better) and support-weighted F-score."""

    purity: float
    entropy: float
    fscore: float
    n_cells: int

    def as_dict(self) -> dict:
        return {"purity": self.purity, "entropy": self.entropy, "fscore": self.fscore,
                "n_cells": self.n_cells}


def contingency(clusters: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Count matrix ``[cluster, class]`` of two integer labelings of the same cells.

    Parameters
    ----------
    clusters, classes : ndarray, shape (N,), int
        Non-negative labels.

    Returns
    -------
    ndarray, shape (max(clusters)+1, max(classes)+1), int64
    """
    clusters = np.asarray(clusters, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)
    table = np.zeros((clusters.max() + 1, classes.max() + 1), dtype=np.int64)
    np.add.at(table, (clusters, classes), 1)
    return table


def clustering_score(clusters: np.ndarray, classes: np.ndarray) -> ClusteringScore:
    """Score a clustering against reference classes as the paper does.

    Each cluster is assigned its majority class.  Purity is the fraction of cells in
    their cluster's majority class; entropy is the size-weighted mean over clusters of
    the class entropy inside each cluster (natural log); the F-score is the per-class
    F1 of the majority assignment, averaged weighted by class support.

    Parameters
    ----------
    clusters, classes : ndarray, shape (N,), int
        Cluster of each cell and its reference class (non-negative integers).
    """
    clusters = np.asarray(clusters)
    classes = np.asarray(classes)
    if clusters.shape != classes.shape or clusters.size == 0:
        raise ValueError("clusters and classes must be non-empty and of the same length")
    _, clusters = np.unique(clusters, return_inverse=True)
    _, classes = np.unique(classes, return_inverse=True)
    table = contingency(clusters, classes)
    n = table.sum()
    cluster_size = table.sum(axis=1)
    purity = table.max(axis=1).sum() / n

    p = table / cluster_size[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cell_entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    entropy = float((cluster_size / n * cell_entropy).sum())

    predicted_class = table.argmax(axis=1)[clusters]
    support = np.bincount(classes)
    true_pos = np.bincount(classes[predicted_class == classes], minlength=len(support))
    n_pred = np.bincount(predicted_class, minlength=len(support))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_pred > 0, true_pos / n_pred, 0.0)
        recall = true_pos / support
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    fscore = float((f1 * support).sum() / n)
    return ClusteringScore(float(purity), entropy, fscore, int(n))
