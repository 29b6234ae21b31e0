"""End-to-end prediction: real ingest (Dask), a really (briefly) trained model, labels back in
the store, proportions, slide classes and the report."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_DATA, shared_data_path
from PIL import Image

from wsicell.analysis.slide_classes import SlideClassifier
from wsicell.cli.main import main
from wsicell.config import PredictConfig, SegmentationConfig, TrainConfig, WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.store import (
    complete_slides,
    labelled_models,
    labels_complete,
    open_store,
    read_labels,
    validate_store,
)
from wsicell.learning.saved_model import load_trained_model
from wsicell.pipeline.ingest import ingest
from wsicell.pipeline.predict import predict
from wsicell.pipeline.training import train
from wsicell.viz.figures import image_is_blank

DASK = {"workers": 2, "threads_per_worker": 1, "memory_limit": "2GB", "progress": False}


def _quadrant_slides(directory):
    """Eight 600x600 slides: the quadrants of the two vendored bone-marrow images."""
    directory.mkdir()
    for image in sorted((TEST_DATA / "bm_graz" / "images").glob("*.png")):
        rgb = np.asarray(Image.open(image).convert("RGB"))
        for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            Image.fromarray(rgb[r * 600:(r + 1) * 600, c * 600:(c + 1) * 600]).save(
                directory / f"{image.stem}_q{q}.png")
    return directory


def _train(store, out, categories, seed=0):
    config = WsicellConfig(train=TrainConfig(categories=categories, width=16, batch_size=32,
                                             critic_steps=1, seed=seed))
    train(store, out, config, device="cpu", max_iters=2, progress=False)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Slides ingested, two trained models (k=5, k=3) and one prediction run."""
    base = tmp_path_factory.mktemp("predict")
    slides = _quadrant_slides(base / "slides")
    store = base / "cells.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain PNGs carry no mpp
        ingest(store, [slides], WsicellConfig(), **DASK)
    model = _train(store, base / "model", 5)
    other = _train(store, base / "model3", 3, seed=1)
    labels = base / "labels.csv"
    pd.DataFrame({"slide_id": [p.stem for p in sorted(slides.glob("*.png"))],
                  "label": ["a"] * 4 + ["b"] * 4}).to_csv(labels, index=False)
    report = predict(store, slides, model, base / "out", labels=labels,
                            device="cpu", **DASK)
    return {"base": base, "slides": slides, "store": store, "model": model, "other": other,
            "labels": labels, "out": base / "out", "report": report}


@pytest.fixture(scope="module")
def unlabelled_model(world):
    """A trained model (k=4) that the bad-input tests must never get to label with."""
    return _train(world["store"], world["base"] / "unlabelled", 4, seed=2)


def _label_files(store):
    """Modification time of every file under the labels groups."""
    return {str(p): p.stat().st_mtime_ns for p in store.rglob("*") if "labels" in p.parts
            and p.is_file()}


def test_every_complete_slide_is_labelled(world):
    root = open_store(world["store"])
    model = load_trained_model(world["model"])
    slides = complete_slides(root)
    assert len(slides) == 8
    for slide_id in slides:
        assert labels_complete(root, slide_id, model.model_id)
        cluster, proba = read_labels(root, slide_id, model.model_id)
        assert len(cluster) == root[f"slides/{slide_id}"].attrs["n_cells"] > 0
        assert proba.shape == (len(cluster), 5)
        np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
        np.testing.assert_array_equal(cluster, proba.argmax(axis=1))
    assert validate_store(world["store"]) == []


def test_proportions_sum_to_one_and_grid_covers_tissue(world):
    out = world["out"]
    slides = pd.read_parquet(out / "slide_proportions.parquet")
    p = slides[[f"p_{i}" for i in range(5)]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert pd.read_csv(out / "slide_proportions.csv").shape == slides.shape
    grid = pd.read_parquet(out / "grid_proportions.parquet")
    np.testing.assert_allclose(grid[[f"p_{i}" for i in range(5)]].sum(axis=1), 1.0)
    # every cell of a slide falls into some region of its grid
    assert (grid.groupby("slide_id").n_cells.sum() == slides.set_index("slide_id").n_cells).all()
    root = open_store(world["store"])
    model_id = load_trained_model(world["model"]).model_id
    for slide_id in slides.slide_id:
        slide = root[f"slides/{slide_id}"]
        array = slide[f"labels/{model_id}/region_proportions"]
        rows, cols, k = array.shape
        region_px = array.attrs["region_px"]
        assert k == 5 and array.attrs["region_size_um"] == 500
        assert rows * region_px >= slide.attrs["height"] and cols * region_px >= slide.attrs["width"]
        values = array[:]
        filled = ~np.isnan(values).any(axis=-1)
        np.testing.assert_allclose(values[filled].sum(axis=-1), 1, rtol=1e-5)


def test_slide_predictions_and_classifier(world):
    out = world["out"]
    predictions = pd.read_csv(out / "slide_predictions.csv")
    assert {"kmeans_cluster", "kmeans_distance", "label", "cv_predicted", "svm_class",
            "svm_score"} <= set(predictions.columns)
    assert set(predictions.kmeans_cluster) <= {0, 1}
    summary = json.loads((out / "prediction.json").read_text())
    cv = summary["slide_prediction"]["cross_validation"]
    assert cv["folds"] == 4 and 0 <= cv["fscore"] <= 1
    assert summary["config"]["predict"]["region_size_um"] == 500
    assert summary["wsicell_version"]
    clf = SlideClassifier.load(out / "slide_classifier.json")
    assert clf.n_features == 5 and set(clf.classes) == {"a", "b"}


def test_report_and_pictures_are_not_blank(world):
    report = world["report"]
    assert report == world["out"] / "report.html" and report.stat().st_size > 10_000
    pictures = sorted((world["out"] / "report").glob("*.png"))
    names = {p.name for p in pictures}
    assert {"generator.png", "slides_pca.png", "proportions.png"} <= names
    assert sum(n.startswith("gallery_cluster_") for n in names) == 5
    assert sum(n.startswith("slide_") for n in names) == 8
    for picture in pictures:
        assert not image_is_blank(picture), picture
        assert picture.name in report.read_text()


def test_report_shows_the_configuration_the_model_was_trained_with(world):
    """The model was trained with width 16, batch 32, 1 critic step and k=5 (not the
    defaults 128, 64, 5): the report and prediction.json say so."""
    trained = load_trained_model(world["model"]).config.train
    assert (trained.width, trained.batch_size, trained.critic_steps) == (16, 32, 1)
    page = world["report"].read_text()
    model_section = page[page.index("<h2>Model</h2>"):page.index("<h2>Provenance</h2>")]
    for setting, value in [("width", "16"), ("batch_size", "32"), ("critic_steps", "1"),
                           ("categories", "5")]:
        assert f"<td>{setting}</td>\n      <td>{value}</td>" in model_section, setting
    # the default nucleus_px and size_channel: the generator section says what G shows of size
    drawn = page[page.index("What the model draws"):page.index("Slides in detail")]
    assert trained.nucleus_px > 0 and trained.size_channel > 0
    assert "scaled to one size" in drawn and "measured size is a separate input" in drawn
    summary = json.loads((world["out"] / "prediction.json").read_text())
    assert summary["model_config"]["train"] == trained.model_dump(mode="json")


def test_rerun_is_a_no_op_and_another_model_writes_beside(world):
    before = _label_files(world["store"])
    predict(world["store"], world["slides"], world["model"], world["out"],
                   labels=world["labels"], device="cpu", **DASK)
    assert _label_files(world["store"]) == before
    predict(world["store"], world["slides"], world["other"], world["base"] / "out3",
                   device="cpu", **DASK)
    after = _label_files(world["store"])
    assert {k: v for k, v in after.items() if k in before} == before
    root = open_store(world["store"])
    first, second = (load_trained_model(m).model_id for m in (world["model"], world["other"]))
    slide_id = complete_slides(root)[0]
    assert labelled_models(root, slide_id) == sorted([first, second])
    assert read_labels(root, slide_id, second)[1].shape[1] == 3


def test_saved_classifier_is_reused_and_k_must_match(world):
    out = world["base"] / "reuse"
    predict(world["store"], world["slides"], world["model"], out,
                   classifier=world["out"] / "slide_classifier.json", device="cpu", **DASK)
    predictions = pd.read_csv(out / "slide_predictions.csv")
    assert set(predictions.svm_class) <= {"a", "b"}
    with pytest.raises(WsicellError, match="trained on 5 cell types"):
        predict(world["store"], world["slides"], world["other"], out,
                       classifier=world["out"] / "slide_classifier.json", device="cpu", **DASK)


def test_annotated_regions(world, tmp_path):
    slide_id = sorted(p.stem for p in world["slides"].glob("*.png"))[0]
    ring = [[0, 0], [300, 0], [300, 300], [0, 300], [0, 0]]
    (tmp_path / f"{slide_id}.geojson").write_text(json.dumps({
        "type": "FeatureCollection", "features": [{
            "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": "corner"}}]}))
    out = tmp_path / "out"
    predict(world["store"], world["slides"], world["model"], out,
                   regions=tmp_path / f"{slide_id}.geojson", device="cpu", **DASK)
    table = pd.read_csv(out / "annotation_proportions.csv")
    assert table.slide_id.tolist() == [slide_id] and table.region.tolist() == ["corner"]
    assert 0 < table.n_cells[0] < pd.read_csv(out / "slide_proportions.csv").n_cells[0]


@pytest.mark.parametrize("content, message", [
    ("slide_id,label\nnot_a_slide,a\nBM_GRAZ_HE_0001_01_q0,b\n", "unknown slide"),
    ("slide_id,label\nBM_GRAZ_HE_0001_01_q0,a\nBM_GRAZ_HE_0001_01_q1,a\n", "two distinct labels"),
])
def test_bad_labels_leave_the_store_untouched(world, unlabelled_model, tmp_path, content,
                                              message):
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    fresh = unlabelled_model
    before = _label_files(world["store"])
    with pytest.raises(WsicellError, match=message):
        predict(world["store"], world["slides"], fresh, tmp_path / "out", labels=labels,
                       device="cpu", **DASK)
    assert _label_files(world["store"]) == before


def test_point_geojson_is_refused_before_labelling(world, unlabelled_model, tmp_path):
    bad = tmp_path / f"{sorted(p.stem for p in world['slides'].glob('*.png'))[0]}.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
        "properties": {}}]}))
    fresh = unlabelled_model
    before = _label_files(world["store"])
    with pytest.raises(WsicellError, match="Point geometry"):
        predict(world["store"], world["slides"], fresh, tmp_path / "out", regions=bad,
                       device="cpu", **DASK)
    assert _label_files(world["store"]) == before


def test_crop_size_mismatch_is_refused(world, tmp_path):
    slides = tmp_path / "small"
    slides.mkdir()
    source = sorted(world["slides"].glob("*.png"))[0]
    (slides / source.name).write_bytes(source.read_bytes())
    store = tmp_path / "crops24.zarr"
    config = WsicellConfig(segmentation=SegmentationConfig(crop_size=24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest(store, [slides], config, **DASK)
    with pytest.raises(WsicellError, match="crops of shape"):
        predict(store, slides, world["model"], tmp_path / "out", config=config,
                       device="cpu", **DASK)
    root = open_store(store)
    assert "labels" not in root[f"slides/{source.stem}"]


def test_empty_slides_dir_and_cli_errors(world, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WsicellError, match="no slide"):
        predict(world["store"], empty, world["model"], tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--slides", str(empty), "--model", str(world["model"]),
              "--store", str(world["store"]), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "wsicell: error:" in capsys.readouterr().err


def test_cli_predict_rerun(world, tmp_path, capsys):
    main(["predict", "--slides", str(world["slides"]), "--model", str(world["model"]),
          "--store", str(world["store"]), "--out", str(tmp_path / "cli"), "--region-size", "100",
          "--slide-clusters", "3", "--no-progress", "--workers", "1"])
    assert "report:" in capsys.readouterr().out
    summary = json.loads((tmp_path / "cli" / "prediction.json").read_text())
    assert summary["config"]["predict"]["region_size_um"] == 100
    assert summary["slide_prediction"]["kmeans"]["clusters"] == 3


@pytest.mark.slow
def test_predict_on_cmu1_slide(world, tmp_path):
    slides = tmp_path / "cmu"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(
        shared_data_path("slides", "CMU-1-Small-Region.svs"))
    store = tmp_path / "cmu.zarr"
    config = WsicellConfig(predict=PredictConfig(region_size_um=250))
    report = predict(store, slides, world["model"], tmp_path / "out", config=config,
                            device="cpu", **DASK)
    root = open_store(store)
    model_id = load_trained_model(world["model"]).model_id
    slide = root["slides/CMU-1-Small-Region"]
    assert labels_complete(root, "CMU-1-Small-Region", model_id)
    grid = slide[f"labels/{model_id}/region_proportions"]
    assert grid.shape[0] * grid.attrs["region_px"] >= slide.attrs["height"]
    assert grid.shape[1] * grid.attrs["region_px"] >= slide.attrs["width"]
    # the tissue is covered: every region that holds tissue in the mask has cells counted
    table = pd.read_csv(tmp_path / "out" / "grid_proportions.csv")
    assert table.n_cells.sum() == slide.attrs["n_cells"] > 100
    for picture in (tmp_path / "out" / "report").glob("*.png"):
        assert not image_is_blank(picture), picture
    assert report.exists()


def test_export_includes_clusters_and_probabilities(world, tmp_path):
    from wsicell.io.export import export_cells

    root = open_store(world["store"])
    slide_id = complete_slides(root)[0]
    table_path = tmp_path / "cells.csv"
    # two models have labels now or later: name the model explicitly
    model_id = load_trained_model(world["model"]).model_id
    n = export_cells(world["store"], table_path, "csv", [slide_id], labels=model_id)
    table = pd.read_csv(table_path)
    assert len(table) == n and {"cluster", *[f"proba_{i}" for i in range(5)]} <= set(table.columns)
    np.testing.assert_array_equal(table.cluster, read_labels(root, slide_id, model_id)[0])
    geojson = tmp_path / "cells.geojson"
    export_cells(world["store"], geojson, "geojson", [slide_id], labels=model_id)
    feature = json.loads(geojson.read_text())["features"][0]["properties"]
    assert feature["classification"]["name"] == f"cluster {table.cluster[0]}"
    assert len(feature["classification"]["color"]) == 3
    assert feature["measurements"]["Cluster 0 probability"] == pytest.approx(table.proba_0[0],
                                                                      rel=1e-6)


def _quadrant_points(slides, directory):
    """bm_graz centre points moved into each quadrant slide, labelled by the half they lie in."""
    directory.mkdir()
    for dots in sorted((TEST_DATA / "bm_graz" / "dots").glob("*.csv")):
        points = pd.read_csv(dots)
        for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            inside = points[(points.x // 600 == c) & (points.y // 600 == r)]
            x, y = inside.x - 600 * c, inside.y - 600 * r
            pd.DataFrame({"x": x, "y": y, "label": np.where(y < 300, "top", "bottom")}).to_csv(
                directory / f"{dots.stem}_q{q}.csv", index=False)
    (directory / "not_a_slide.csv").write_text("x,y,label\n1,1,top\n")
    return directory


def test_evaluate_clustering_gan_next_to_baseline(world, tmp_path, capsys):
    points = _quadrant_points(world["slides"], tmp_path / "points")
    main(["evaluate", "clustering", "--store", str(world["store"]), "--model",
          str(world["model"]), "--points", str(points), "--radius", "12", "--json"])
    captured = capsys.readouterr()
    assert "not_a_slide.csv" in captured.err and "skipped" in captured.err
    result = json.loads(captured.out)
    assert set(result) >= {"gan", "baseline", "matched"}
    n_points = sum(len(pd.read_csv(p)) for p in points.glob("BM*.csv"))
    assert 0.5 * n_points < result["matched"] <= n_points
    assert sum(result["slides"].values()) == result["matched"] and len(result["slides"]) == 8
    for method in ("gan", "baseline"):
        scores = result[method]
        assert 0.5 <= scores["purity"] <= 1 and 0 <= scores["fscore"] <= 1
        assert 0 <= scores["entropy"] <= np.log(2) + 1e-9
        assert scores["n_cells"] == result["matched"]
    main(["evaluate", "clustering", "--store", str(world["store"]), "--model",
          str(world["model"]), "--points", str(points)])
    text = capsys.readouterr().out
    assert "GAN (Q head)" in text and "MF + k-means" in text


def test_evaluate_slides_matches_the_prediction_run(world, capsys):
    main(["evaluate", "slides", "--predictions", str(world["out"]), "--labels",
          str(world["labels"]), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["n_slides"] == 8 and 0.5 <= result["kmeans"]["purity"] <= 1
    cv = json.loads((world["out"] / "prediction.json").read_text())["slide_prediction"][
        "cross_validation"]
    assert result["cross_validation"]["fscore"] == pytest.approx(cv["fscore"])
    assert set(result["svm"]) == {"precision", "recall", "fscore"}


def test_interrupted_labelling_never_looks_complete(world, tmp_path):
    """Labels cut off after part of a chunk are not complete; the next run redoes them."""
    from wsicell.io.store import begin_labels, slide_crops
    from wsicell.pipeline.labelling import ChunkTask, label_chunk, label_slides

    model_dir = _train(world["store"], tmp_path / "fresh", 4, seed=4)
    model = load_trained_model(model_dir)
    root = open_store(world["store"], mode="r+")
    slide_id = complete_slides(root)[-1]
    begin_labels(root, slide_id, model.model_id, model.k, {})
    label_chunk(ChunkTask(str(world["store"]), slide_id, 0, 7), model, 1024)
    assert not labels_complete(root, slide_id, model.model_id)
    with pytest.raises(WsicellError, match="no complete labels"):
        read_labels(root, slide_id, model.model_id)
    assert label_slides(world["store"], [slide_id], model_dir, model, WsicellConfig(),
                        progress=False) == [slide_id]
    cluster, proba = read_labels(root, slide_id, model.model_id)
    expected = model.classify(slide_crops(root, slide_id)[:])
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    np.testing.assert_array_equal(cluster, expected.argmax(axis=1))


def test_a_collapsed_model_is_reported_in_words(world, tmp_path):
    """A model whose Q puts every cell in cluster 0: predict warns (a collapse, empty
    clusters) and the report's summary says so."""
    import torch

    from wsicell.learning.model import model_for
    from wsicell.learning.saved_model import save_trained_model

    config = WsicellConfig(train=TrainConfig(width=8))
    network = model_for(config.train)
    with torch.no_grad():
        network.q_head.weight.zero_()
        network.q_head.bias.copy_(torch.tensor([50.0, 0, 0, 0, 0]))
    model_dir = tmp_path / "collapsed"
    model_dir.mkdir()
    save_trained_model(model_dir, network, config, {})
    with pytest.warns(UserWarning) as caught:
        report = predict(world["store"], world["slides"], model_dir, tmp_path / "out",
                         device="cpu", **DASK)
    messages = [str(w.message) for w in caught]
    assert any("Cluster 0 holds 100% of all cells" in m for m in messages), messages
    assert any("Clusters 1, 2, 3, 4 hold no cell" in m for m in messages), messages
    page = report.read_text()
    assert "Cluster 0 holds 100% of all cells" in page
    assert "Clusters 1, 2, 3, 4 hold no cell" in page
