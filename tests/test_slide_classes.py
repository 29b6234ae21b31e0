import json

import numpy as np
import pytest

from wsicell.analysis.slide_classes import (
    SlideClassifier,
    SlideKMeans,
    cross_validate,
    read_slide_labels,
)
from wsicell.errors import WsicellError


def _two_groups(n=12, seed=0):
    """Proportion vectors of 'normal' slides (many of type 0) and 'abnormal' (many of type 2)."""
    rng = np.random.default_rng(seed)
    normal = rng.dirichlet([8, 2, 1, 1], n)
    abnormal = rng.dirichlet([1, 2, 8, 1], n)
    return np.vstack([normal, abnormal]), np.array(["normal"] * n + ["abnormal"] * n)


def test_kmeans_separates_two_groups():
    p, labels = _two_groups()
    km = SlideKMeans.fit(p, 2, seed=0)
    cluster, distance = km.assign(p)
    assert distance.shape == (24,) and (distance >= 0).all()
    # one cluster per group, up to naming
    agreement = max((cluster == (labels == "abnormal")).mean(), (cluster == (labels == "normal")).mean())
    assert agreement >= 0.9


def test_kmeans_needs_enough_slides():
    with pytest.raises(WsicellError, match="cannot form 2 clusters"):
        SlideKMeans.fit(np.array([[0.5, 0.5]]), 2)


def test_svm_cross_validation_and_json_roundtrip(tmp_path):
    p, labels = _two_groups()
    cv = cross_validate(p, labels, folds=4)
    assert cv["folds"] == 4
    assert cv["fscore"] >= 0.9 and cv["precision"] >= 0.9 and cv["recall"] >= 0.9
    clf = SlideClassifier.fit(p, labels)
    path = clf.save(tmp_path / "clf.json")
    again = SlideClassifier.load(path)
    np.testing.assert_array_equal(again.predict(p)[0], clf.predict(p)[0])
    assert (again.predict(p)[0] == labels).mean() >= 0.9
    new_slide = np.array([[0.05, 0.15, 0.75, 0.05]])
    assert again.predict(new_slide)[0].tolist() == ["abnormal"]


def test_multiclass_svm():
    rng = np.random.default_rng(3)
    p = np.vstack([rng.dirichlet(a, 8) for a in ([9, 1, 1], [1, 9, 1], [1, 1, 9])])
    labels = np.repeat(["a", "b", "c"], 8)
    clf = SlideClassifier.fit(p, labels)
    assert clf.coef.shape == (3, 3)
    predicted, score = clf.predict(p)
    assert (predicted == labels).mean() >= 0.9 and score.shape == (24,)


def test_classifier_rejects_wrong_k_and_foreign_json(tmp_path):
    p, labels = _two_groups()
    clf = SlideClassifier.fit(p, labels)
    with pytest.raises(WsicellError, match="trained on 4 cell types"):
        clf.predict(np.ones((2, 5)) / 5)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "slide_linear_svm", "classes": ["a", "b"],
                               "coef": [[1, 2], [3, 4]], "intercept": [0]}))
    with pytest.raises(WsicellError, match="invalid slide classifier"):
        SlideClassifier.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(WsicellError, match="invalid slide classifier"):
        SlideClassifier.load(bad)


def test_cross_validation_lowers_folds_to_smallest_class():
    p, labels = _two_groups(n=3)
    with pytest.warns(UserWarning, match="lowered to 3"):
        assert cross_validate(p, labels, folds=4)["folds"] == 3
    with pytest.raises(WsicellError, match="at least 2 slides"):
        cross_validate(p[:4], labels[:4], folds=2)


def test_read_slide_labels(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,normal\nb, abnormal\n")
    labels = read_slide_labels(path, ["a", "b", "c"])
    assert labels.to_dict() == {"a": "normal", "b": "abnormal"}


@pytest.mark.parametrize("content, message", [
    ("slide_id,label\na,x\nzzz,y\n", "unknown slide"),
    ("slide_id,label\na,x\nb,x\n", "two distinct labels"),
    ("slide,label\na,x\nb,y\n", "needs columns"),
    ("slide_id,label\na,x\na,y\n", "listed twice"),
    ("slide_id,label\na,\nb,y\n", "empty slide_id or label"),
    ("", "not a readable CSV"),
])
def test_bad_labels_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(WsicellError, match=message):
        read_slide_labels(path, ["a", "b"])
