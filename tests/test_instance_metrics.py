"""Instance-segmentation metrics on hand-made label images with hand-computed values."""

from fractions import Fraction

import numpy as np
import pytest

from wsicell.analysis.metrics import (
    aggregated_jaccard_index,
    detection_score,
    label_centroids,
    overlap_table,
    panoptic_quality,
    pixel_iou_f1,
    segmentation_scores,
)


def _pair():
    """reference: A (label 1, 2x2 = 4 px), B (label 2, 2x3 = 6 px).
    predicted: 5 covers A plus 2 px (6 px, IoU 4/6 with A); 7 lies inside B (4 px, IoU
    4/6); 60000 is a 2-px false positive (labels need not be contiguous)."""
    ref = np.zeros((4, 6), dtype=np.int32)
    ref[0:2, 0:2] = 1
    ref[0:2, 3:6] = 2
    pred = np.zeros((4, 6), dtype=np.uint16)
    pred[0:2, 0:3] = 5
    pred[0:2, 4:6] = 7
    pred[3, 0:2] = 60000
    return ref, pred


def test_aji_by_hand():
    ref, pred = _pair()
    # C = 4 + 4; U = 6 + 6 + 2 (the unpaired prediction)
    assert aggregated_jaccard_index(ref, pred) == pytest.approx(float(Fraction(4, 7)))


def test_pq_by_hand():
    ref, pred = _pair()
    score = panoptic_quality(ref, pred)
    # TP = 2 (IoU 2/3 each), FP = 1, FN = 0: DQ = 2 / (2 + 1/2) = 4/5, SQ = 2/3, PQ = 8/15
    assert (score.true_positives, score.n_predicted, score.n_reference) == (2, 3, 2)
    assert score.dq == pytest.approx(float(Fraction(4, 5)))
    assert score.sq == pytest.approx(float(Fraction(2, 3)))
    assert score.pq == pytest.approx(float(Fraction(8, 15)))


def test_split_and_merge():
    one = np.full((2, 4), 3, dtype=np.int64)
    halves = np.zeros((2, 4), dtype=np.int64)
    halves[:, :2], halves[:, 2:] = 1, 2
    # split: C = 4, U = 8 + 4 (the other half unpaired) -> 1/3; IoU 1/2 is no PQ match
    assert aggregated_jaccard_index(one, halves) == pytest.approx(float(Fraction(1, 3)))
    assert panoptic_quality(one, halves).pq == 0.0
    # merge: both halves pair with the whole: C = 4 + 4, U = 8 + 8 -> 1/2
    assert aggregated_jaccard_index(halves, one) == pytest.approx(float(Fraction(1, 2)))


def test_perfect_and_relabelled():
    ref, _ = _pair()
    assert aggregated_jaccard_index(ref, ref * 3) == 1.0
    score = panoptic_quality(ref, ref + (ref > 0))
    assert (score.dq, score.sq, score.pq) == (1.0, 1.0, 1.0)
    assert pixel_iou_f1(ref, ref) == (1.0, 1.0)


def test_pixel_iou_f1_by_hand():
    ref, pred = _pair()
    # |R| = 10, |P| = 12, |R & P| = 8, |R | P| = 14
    iou, f1 = pixel_iou_f1(ref, pred)
    assert iou == pytest.approx(float(Fraction(8, 14)))
    assert f1 == pytest.approx(float(Fraction(16, 22)))


def test_empty_prediction_scores_zero():
    ref, _ = _pair()
    empty = np.zeros_like(ref)
    assert aggregated_jaccard_index(ref, empty) == 0.0
    assert panoptic_quality(ref, empty).pq == 0.0
    assert pixel_iou_f1(ref, empty) == (0.0, 0.0)
    assert label_centroids(empty).shape == (0, 2)
    scores = segmentation_scores(ref, empty, radius=3)
    assert scores["aji"] == scores["pq"] == scores["iou"] == 0.0
    assert scores["detection"].f1 == 0.0 and scores["detection"].n_reference == 2
    # and nothing against nothing
    assert aggregated_jaccard_index(empty, empty) == 1.0
    assert detection_score(np.zeros((0, 2)), np.zeros((0, 2)), 3).f1 == 0.0


def test_disjoint():
    a = np.zeros((3, 3), dtype=np.int32)
    b = np.zeros((3, 3), dtype=np.int32)
    a[0, 0], b[2, 2] = 1, 1
    assert aggregated_jaccard_index(a, b) == 0.0
    assert panoptic_quality(a, b).pq == 0.0


def test_overlap_table_and_bad_input():
    ref, pred = _pair()
    t, p, inter, ref_area, pred_area = overlap_table(ref, pred)
    assert t.tolist() == [1, 2] and p.tolist() == [1, 2] and inter.tolist() == [4, 4]
    assert ref_area.tolist() == [14, 4, 6] and pred_area.tolist() == [12, 6, 4, 2]
    with pytest.raises(ValueError, match="shape"):
        overlap_table(ref, pred[:3])
    with pytest.raises(ValueError, match="non-negative"):
        aggregated_jaccard_index(-ref, pred)


def test_centroids_and_detection_by_hand():
    ref, pred = _pair()
    np.testing.assert_allclose(label_centroids(ref), [[0.5, 0.5], [4.0, 0.5]])
    # predicted centroids (1, 0.5), (4.5, 0.5), (0.5, 3): two within 1 px -> P 2/3, R 1
    score = segmentation_scores(ref, pred, radius=1.0)["detection"]
    assert score.true_positives == 2
    assert score.f1 == pytest.approx(float(Fraction(4, 5)))
