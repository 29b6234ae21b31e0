"""Detection matching and clustering scores."""

import numpy as np
import pytest

from wsicell.analysis.metrics import clustering_score, detection_score, match_points


def test_matching_is_one_to_one_and_within_radius():
    predicted = np.array([[0, 0], [1, 0], [50, 50]], float)
    reference = np.array([[0.5, 0], [100, 100]], float)
    matches = match_points(predicted, reference, radius=2)
    assert len(matches) == 1
    score = detection_score(predicted, reference, 2)
    assert (score.true_positives, score.n_predicted, score.n_reference) == (1, 3, 2)
    assert score.precision == pytest.approx(1 / 3) and score.recall == pytest.approx(0.5)


def test_matching_maximises_matches_not_greedy_nearest():
    # Greedy nearest would pair p0-r0 and leave p1 unmatched; Hungarian matches both.
    predicted = np.array([[0, 0], [3, 0]], float)
    reference = np.array([[1.5, 0], [-1.4, 0]], float)
    assert len(match_points(predicted, reference, radius=1.6)) == 2


def test_empty_inputs():
    assert detection_score(np.empty((0, 2)), np.array([[1.0, 1.0]]), 5).f1 == 0.0
    assert len(match_points(np.array([[1.0, 1.0]]), np.empty((0, 2)), 5)) == 0


def test_clustering_score_by_hand():
    clusters = np.array([0, 0, 0, 1, 1, 1, 1])
    classes = np.array([5, 5, 7, 7, 7, 7, 5])
    score = clustering_score(clusters, classes)
    assert score.purity == pytest.approx(5 / 7)
    h = lambda p: -sum(x * np.log(x) for x in p)  # noqa: E731
    assert score.entropy == pytest.approx(3 / 7 * h([2 / 3, 1 / 3]) + 4 / 7 * h([3 / 4, 1 / 4]))
    # majority: cluster 0 -> 5, cluster 1 -> 7; class 5: P=2/3 R=2/3; class 7: P=3/4 R=3/4
    assert score.fscore == pytest.approx(3 / 7 * 2 / 3 + 4 / 7 * 3 / 4)


def test_perfect_clustering():
    labels = np.array([2, 2, 9, 9, 4])
    score = clustering_score(labels, labels)
    assert (score.purity, score.entropy, score.fscore) == (1.0, 0.0, 1.0)
