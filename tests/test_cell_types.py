"""benchmarks/cell_types.py: the mask-feature baseline, the fitting of baselines on train
cells only, and the closing figures (the full benchmark runs on ../shared/data)."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import cell_types


def nucleus_crop(radius_rows: float, radius_cols: float, shade: int) -> np.ndarray:
    """A 32x32 crop on white with one elliptic nucleus of grey-purple ``shade``."""
    rows, cols = np.mgrid[:32, :32] - 15.5
    inside = (rows / radius_rows) ** 2 + (cols / radius_cols) ** 2 <= 1
    crop = np.full((32, 32, 3), 255, np.uint8)
    crop[inside] = (shade, shade // 2, shade + 40)
    return crop


def test_mask_features_see_size_shape_and_stain():
    round_dark = nucleus_crop(8, 8, 60)
    long_pale = nucleus_crop(3, 12, 150)
    crops = np.stack([round_dark, long_pale])
    masks = (crops != 255).any(axis=-1)
    features = cell_types.mask_features(crops, masks, np.array([40.0, 20.0]))
    assert features.shape == (2, 7)
    assert features[:, 0] == pytest.approx(np.log([40.0, 20.0]))
    eccentricity, solidity, extent, roughness, mean_h, _ = features.T[1:]
    assert eccentricity[0] < 0.2 and eccentricity[1] > 0.9
    assert (solidity > 0.9).all() and (extent > 0.6).all() and (roughness > 0.8).all()
    assert mean_h[0] > mean_h[1]  # darker nucleus, more hematoxylin
    # the shape is the stored mask's, not the crop's non-white pixels
    swapped = cell_types.mask_features(crops, masks[::-1], np.array([40.0, 20.0]))
    assert swapped[0, 1] > 0.9 and swapped[1, 1] < 0.2


def test_baselines_fit_on_train_cells_only():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 3))
    test = rng.normal(size=(50, 3)) + 100.0  # far from every train centre
    features = np.vstack([train, test])
    fit = np.arange(250) < 200
    clusters = cell_types.baseline_clusters("mask", features, fit, seed=0)
    assert len(np.unique(clusters[:200])) == cell_types.K
    assert len(np.unique(clusters[200:])) == 1  # test cells only assigned, never fitted


def test_scores_and_summary():
    labels = np.array(["a"] * 60 + ["b"] * 40)
    perfect = cell_types.scores(np.r_[np.zeros(60, int), np.ones(40, int)], labels)
    assert perfect["purity"] == 1 and perfect["nmi"] == pytest.approx(1)
    assert perfect["largest"] == 0.6 and perfect["sizes"] == [60, 40, 0, 0, 0]
    collapsed = cell_types.scores(np.zeros(100, int), labels)
    assert collapsed["purity"] == 0.6 and collapsed["nmi"] == 0 and collapsed["largest"] == 1
    rows = pd.DataFrame([{"method": "Q", "split": "test", "seed": s, **perfect} for s in (0, 1)]
                        + [{"method": "pixel_pca", "split": "test", "seed": 0, **collapsed}])
    figures = cell_types.summary(rows, "test")
    assert figures["purity_min"] == 1 and figures["largest_cluster_fraction"] == 0.6
    assert figures["best_baseline_purity"] == 0.6 and figures["best_baseline"] == "pixel_pca"


def test_brca_split_keeps_each_case_on_one_side():
    """Every TCGA case (both of its slides) is on one side; a quarter of the cases test."""
    data = cell_types.cell_sets(cell_types.DATA)["brca"]
    if not data.data.is_dir():
        pytest.skip("../shared/data/brca_m2c is absent")
    images = data.images()
    split = cell_types.brca_split(images)
    sides = pd.DataFrame({"case": [cell_types.brca_case(p) for p in images],
                          "split": [split[p.stem] for p in images]})
    assert (sides.groupby("case").split.nunique() == 1).all()
    cases = sides.drop_duplicates("case").split.value_counts()
    assert cases["test"] == len(sides.case.unique()) // 4
    assert set(data.splits(images).values()) == {"train", "test"}


def test_hog_dec_separates_cells_of_distinct_shapes():
    """HOG + DEC on crops of round and of long nuclei, fitted on some, applied to all: the
    two shapes land in different clusters (k=2 here), the unseen crops too."""
    from wsicell.learning.dec import dec_clusters

    rng = np.random.default_rng(0)
    crops = np.stack([nucleus_crop(r, c, int(rng.integers(50, 120)))
                      for r, c in [(8, 8)] * 60 + [(3, 12)] * 60])
    hog = cell_types.baseline_features(
        pd.DataFrame({"area": np.full(120, 30.0)}), crops, (crops != 255).any(-1))["hog_dec"]
    assert hog.shape == (120, 324)
    fit = np.arange(120) % 3 != 0
    clusters = dec_clusters(hog, fit, 2, seed=0, pretrain_epochs=20, max_steps=200)
    assert len(set(clusters[:60])) == 1 and len(set(clusters[60:])) == 1
    assert clusters[0] != clusters[-1]


@pytest.mark.slow
def test_smoke_run_on_both_sets(tmp_path, capsys):
    """The harness's smoke mode on a few patches of CoNSeP and BRCA-M2C: every closing
    figure of both sets is printed, and the purity curve has a row per stage."""
    if not (cell_types.DATA / "consep_patches").is_dir() or \
            not (cell_types.DATA / "brca_m2c").is_dir():
        pytest.skip("../shared/data is absent")
    cell_types.main(["--smoke", "--work", str(tmp_path)])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
                 if ": " in line)
    for prefix in ("consep_", "brca_"):
        for name in ("purity_mean", "purity_min", "nmi_mean", "largest_cluster_fraction",
                     "best_baseline_purity", "best_baseline_nmi", "minutes"):
            assert prefix + name in lines, prefix + name
        assert 0 < float(lines[prefix + "purity_mean"]) <= 1
        assert 0 < float(lines[prefix + "best_baseline_purity"]) <= 1
        curve = pd.read_csv(tmp_path / f"{prefix[:-1]}-curve.csv")
        assert curve.iteration.tolist() == [2, 4]
        assert curve.test_purity.between(0, 1).all()
    assert float(lines["minutes"]) > 0
