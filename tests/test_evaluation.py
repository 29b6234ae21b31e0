"""Reading annotations and scoring slide predictions (file level; the store-backed clustering
evaluation runs end to end in test_predict.py)."""

import pandas as pd
import pytest

from wsicell.analysis.evaluation import evaluate_slide_predictions, matched_cells
from wsicell.errors import WsicellError
from wsicell.io.points import read_points


def test_read_points(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("x,y,label\n1.5,2,tumour\n3,4, lymphocyte\n")
    points = read_points(path)
    assert points.x.tolist() == [1.5, 3.0] and points.label.tolist() == ["tumour", "lymphocyte"]


@pytest.mark.parametrize("content, message", [
    ("x,y\n1,2\n", "needs columns x,y,label"),
    ("x,y,label\n1,b,c\n", "must be numbers"),
    ("", "not a readable points CSV"),
])
def test_bad_points_files(tmp_path, content, message):
    path = tmp_path / "s.csv"
    path.write_text(content)
    with pytest.raises(WsicellError, match=message):
        read_points(path)


def test_points_dir_must_hold_csv_files(tmp_path):
    with pytest.raises(WsicellError, match="not a directory"):
        matched_cells(tmp_path / "store.zarr", tmp_path / "missing", 10)
    with pytest.raises(WsicellError, match="no .csv points file"):
        matched_cells(tmp_path / "store.zarr", tmp_path, 10)


def test_slide_predictions_against_labels(tmp_path):
    predictions = pd.DataFrame({
        "slide_id": ["a", "b", "c", "d"], "kmeans_cluster": [0, 0, 1, 1],
        "svm_class": ["normal", "normal", "abnormal", "normal"],
        "cv_predicted": ["normal", "abnormal", "abnormal", "abnormal"]})
    predictions.to_csv(tmp_path / "slide_predictions.csv", index=False)
    (tmp_path / "labels.csv").write_text("slide_id,label\na,normal\nb,normal\nc,abnormal\n"
                                         "d,abnormal\n")
    result = evaluate_slide_predictions(tmp_path, tmp_path / "labels.csv")
    assert result["n_slides"] == 4
    assert result["kmeans"]["purity"] == 1.0 and result["kmeans"]["entropy"] == 0.0
    assert result["svm"]["recall"] == pytest.approx(0.75)
    assert result["cross_validation"]["recall"] == pytest.approx(0.75)
    (tmp_path / "labels.csv").write_text("slide_id,label\na,normal\nzz,abnormal\n")
    with pytest.raises(WsicellError, match="unknown slide"):
        evaluate_slide_predictions(tmp_path / "slide_predictions.csv", tmp_path / "labels.csv")
