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


# --- Instance segmentation: label images against reference label images ------------------
#
# Every label-image metric below builds one sparse table of the overlapping (reference,
# predicted) label pairs with ``np.bincount`` / ``np.unique`` over the pixels, never a loop
# over objects.  Label images are 2-D non-negative integer arrays, 0 = background; labels
# need not be contiguous.


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """A label image relabelled 0..N (0 stays background) and flattened: ((H*W,) int64, N)."""
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return flat.astype(np.int64), 0
    if not np.issubdtype(flat.dtype, np.integer) and flat.dtype != bool:
        raise ValueError(f"labels must be integers, got {flat.dtype}")
    flat = flat.astype(np.int64, copy=False)
    if flat.min() < 0:
        raise ValueError("labels must be non-negative")
    top = int(flat.max())
    if top < 4 * flat.size + 1:  # a lookup table is cheaper than sorting
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = True
        table = np.cumsum(present) - 1
        return table[flat], int(present.sum() - 1)
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] != 0:
        return inverse.astype(np.int64) + 1, len(ids)
    return inverse.astype(np.int64), len(ids) - 1


def overlap_table(reference: np.ndarray, predicted: np.ndarray):
    """Sparse overlap table of two label images.

    Parameters
    ----------
    reference, predicted : ndarray, shape (H, W), int
        Label images (0 = background) of the same shape.

    Returns
    -------
    ref_id, pred_id : ndarray, shape (K,), int64
        Compact ids (1..N_ref, 1..N_pred, in increasing label order) of the K overlapping
        pairs of objects.
    intersection : ndarray, shape (K,), int64
        Pixels of each pair's intersection.
    ref_area : ndarray, shape (N_ref + 1,), int64
        Pixels of each reference object (index 0 = background).
    pred_area : ndarray, shape (N_pred + 1,), int64
        Pixels of each predicted object (index 0 = background).

    Raises
    ------
    ValueError
        Shapes differ, or labels are negative or not integers.
    """
    reference, predicted = np.asarray(reference), np.asarray(predicted)
    if reference.shape != predicted.shape:
        raise ValueError(f"label images differ in shape: {reference.shape} vs {predicted.shape}")
    t, n_ref = _compact(reference)
    p, n_pred = _compact(predicted)
    ref_area = np.bincount(t, minlength=n_ref + 1).astype(np.int64)
    pred_area = np.bincount(p, minlength=n_pred + 1).astype(np.int64)
    both = np.flatnonzero((t > 0) & (p > 0))
    codes = t[both] * (n_pred + 1) + p[both]
    pairs, intersection = np.unique(codes, return_counts=True)
    return (pairs // (n_pred + 1), pairs % (n_pred + 1), intersection.astype(np.int64),
            ref_area, pred_area)


def aggregated_jaccard_index(reference: np.ndarray, predicted: np.ndarray) -> float:
    """Aggregated Jaccard Index (AJI; Kumar et al., IEEE TMI 2017).

    Each reference object G_i is paired with the predicted object S_j of highest IoU with
    it (none when nothing overlaps); AJI = sum_i |G_i & S_j| / (sum_i |G_i | S_j| + the
    areas of the predicted objects paired with no reference object).

    Parameters
    ----------
    reference, predicted : ndarray, shape (H, W), int
        Label images, 0 = background.

    Returns
    -------
    float
        In [0, 1]: 0 when either image has no object (an empty prediction scores 0), 1 when
        neither has any.

    Examples
    --------
    >>> ref = np.array([[1, 1, 0, 2, 2, 2]])
    >>> pred = np.array([[5, 5, 5, 0, 7, 7]])
    >>> aggregated_jaccard_index(ref, pred)  # (2 + 2) / (3 + 3)
    0.6666666666666666
    """
    t, p, inter, ref_area, pred_area = overlap_table(reference, predicted)
    n_ref, n_pred = len(ref_area) - 1, len(pred_area) - 1
    if n_ref == 0 and n_pred == 0:
        return 1.0
    if n_ref == 0 or n_pred == 0 or len(inter) == 0:
        return 0.0
    union = ref_area[t] + pred_area[p] - inter
    iou = inter / union
    # best predicted partner of each reference object: sort the pairs by (t, -IoU)
    order = np.lexsort((-iou, t))
    first = order[np.r_[True, t[order][1:] != t[order][:-1]]]
    paired_ref = np.zeros(n_ref + 1, dtype=bool)
    paired_ref[t[first]] = True
    used = np.zeros(n_pred + 1, dtype=bool)
    used[p[first]] = True
    overlap = inter[first].sum()
    total = (union[first].sum() + ref_area[1:][~paired_ref[1:]].sum()
             + pred_area[1:][~used[1:]].sum())
    return float(overlap / total) if total else 0.0


@dataclass(frozen=True)
class PanopticScore:
    """Panoptic quality of one image: detection quality ``dq``, segmentation quality ``sq``
    and ``pq = dq * sq``, with the match counts."""

    dq: float
    sq: float
    pq: float
    true_positives: int
    n_predicted: int
    n_reference: int

    def as_dict(self) -> dict:
        return {"dq": self.dq, "sq": self.sq, "pq": self.pq,
                "true_positives": self.true_positives, "n_predicted": self.n_predicted,
                "n_reference": self.n_reference}


def panoptic_quality(reference: np.ndarray, predicted: np.ndarray) -> PanopticScore:
    """Panoptic quality of an instance segmentation (Kirillov et al., CVPR 2019).

    Pairs with IoU > 0.5 are the matches (one-to-one by construction).
    DQ = TP / (TP + FP / 2 + FN / 2), SQ = mean IoU of the matches, PQ = DQ * SQ.

    Parameters
    ----------
    reference, predicted : ndarray, shape (H, W), int
        Label images, 0 = background.

    Returns
    -------
    PanopticScore
        DQ, SQ and PQ are 0 when nothing matches (an empty prediction among them).

    Examples
    --------
    >>> ref = np.array([[1, 1, 0, 2, 2, 2]])
    >>> pred = np.array([[5, 5, 5, 0, 7, 7]])
    >>> score = panoptic_quality(ref, pred)  # TP 2, IoU 2/3 each
    >>> score.dq, round(score.sq, 4), round(score.pq, 4)
    (1.0, 0.6667, 0.6667)
    """
    t, p, inter, ref_area, pred_area = overlap_table(reference, predicted)
    n_ref, n_pred = len(ref_area) - 1, len(pred_area) - 1
    iou = inter / (ref_area[t] + pred_area[p] - inter) if len(inter) else np.zeros(0)
    matched = iou > 0.5
    tp = int(matched.sum())
    if tp == 0:
        return PanopticScore(0.0, 0.0, 0.0, 0, n_pred, n_ref)
    dq = tp / (tp + 0.5 * (n_pred - tp) + 0.5 * (n_ref - tp))
    sq = float(iou[matched].mean())
    return PanopticScore(float(dq), sq, float(dq * sq), tp, n_pred, n_ref)


def pixel_iou_f1(reference: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Foreground IoU and pixel F-score (Dice) of two masks or label images (the paper's
    segmentation IoU / F, method section 4: objects merged into one foreground).

    Parameters
    ----------
    reference, predicted : ndarray, shape (H, W), int or bool
        0 / False = background.

    Returns
    -------
    iou, f1 : float
        Both 1 when neither image has foreground, 0 when only one has.

    Examples
    --------
    >>> pixel_iou_f1(np.array([[1, 1, 0, 0]]), np.array([[0, 3, 3, 0]]))
    (0.3333333333333333, 0.5)
    """
    a, b = np.asarray(reference) != 0, np.asarray(predicted) != 0
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    inter = int(np.count_nonzero(a & b))
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0, 1.0
    return inter / union, 2 * inter / (int(np.count_nonzero(a)) + int(np.count_nonzero(b)))


def label_centroids(labels: np.ndarray) -> np.ndarray:
    """Centroids of the objects of a label image.

    Parameters
    ----------
    labels : ndarray, shape (H, W), int
        0 = background.

    Returns
    -------
    ndarray, shape (N, 2), float64
        (x, y) in pixels (pixel centres at integers), in increasing label order.

    Examples
    --------
    >>> label_centroids(np.array([[0, 4, 4], [9, 0, 0]]))
    array([[1.5, 0. ],
           [0. , 1. ]])
    """
    labels = np.asarray(labels)
    flat, n = _compact(labels)
    pixel = np.flatnonzero(flat)
    label = flat[pixel]
    rows, cols = np.divmod(pixel, labels.shape[1] if labels.ndim == 2 else 1)
    area = np.bincount(label, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.bincount(label, weights=cols, minlength=n + 1)[1:] / area
        y = np.bincount(label, weights=rows, minlength=n + 1)[1:] / area
    return np.stack([x, y], axis=1)


def segmentation_scores(reference: np.ndarray, predicted: np.ndarray,
                        radius: float) -> dict:
    """Every instance figure of one image: pixel IoU / F1, AJI, PQ and the detection of
    predicted centroids among reference centroids within ``radius`` pixels.

    Parameters
    ----------
    reference, predicted : ndarray, shape (H, W), int
        Label images, 0 = background.
    radius : float
        Largest centroid distance of a detection match, pixels.

    Returns
    -------
    dict
        ``iou``, ``f1`` (pixels), ``aji``, ``dq``, ``sq``, ``pq`` (floats) and
        ``detection`` (a :class:`DetectionScore`).

    Examples
    --------
    >>> ref = np.array([[1, 1, 0, 2, 2, 2]])
    >>> s = segmentation_scores(ref, ref, radius=1.0)
    >>> s["aji"], s["pq"], s["detection"].f1
    (1.0, 1.0, 1.0)
    """
    iou, f1 = pixel_iou_f1(reference, predicted)
    pq = panoptic_quality(reference, predicted)
    detection = detection_score(label_centroids(predicted), label_centroids(reference), radius)
    return {"iou": iou, "f1": f1, "aji": aggregated_jaccard_index(reference, predicted),
            "dq": pq.dq, "sq": pq.sq, "pq": pq.pq, "detection": detection}


#: Nucleus area (um2) under which an object is implausibly small for a nucleus (a 3.6 um
#: disk; lymphocyte nuclei, the smallest common ones, are ~20-40 um2).
SMALL_NUCLEUS_UM2 = 10.0


@dataclass(frozen=True)
class AreaSummary:
    """Distribution of nucleus areas, um2: count, quartiles and the implausibly small."""

    n: int
    q25: float
    median: float
    q75: float
    small_fraction: float  #: fraction of objects under ``SMALL_NUCLEUS_UM2``

    def __str__(self) -> str:
        if not self.n:
            return "no nuclei"
        return (f"nucleus area median {self.median:.0f} um2 (quartiles {self.q25:.0f}-"
                f"{self.q75:.0f}), {100 * self.small_fraction:.1f}% under "
                f"{SMALL_NUCLEUS_UM2:g} um2")


def area_summary(area_um2: np.ndarray) -> AreaSummary:
    """Summarise nucleus areas.

    Parameters
    ----------
    area_um2 : ndarray, shape (N,), float
        Nucleus areas, um2.

    Returns
    -------
    AreaSummary

    Examples
    --------
    >>> print(area_summary(np.array([5.0, 20, 30, 40, 50])))
    nucleus area median 30 um2 (quartiles 20-40), 20.0% under 10 um2
    """
    area = np.asarray(area_um2, dtype=np.float64)
    if not len(area):
        return AreaSummary(0, np.nan, np.nan, np.nan, np.nan)
    q25, median, q75 = np.percentile(area, [25, 50, 75])
    return AreaSummary(len(area), float(q25), float(median), float(q75),
                       float((area < SMALL_NUCLEUS_UM2).mean()))
