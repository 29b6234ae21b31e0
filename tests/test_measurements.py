"""Nucleus measurements (wsicell.segmentation.measurements) against scikit-image's regionprops
on the nucleus masks and crops of a real bone-marrow image."""

from functools import lru_cache

import numpy as np
import pytest
import shapely
from PIL import Image
from skimage.measure import regionprops

from wsicell.io.store import (
    CELL_COLUMNS,
    open_store,
    slide_attrs,
    slide_cells,
    slide_crops,
    slide_masks,
)
from wsicell.segmentation.measurements import (
    MEASUREMENT_COLUMNS,
    calipers,
    convex_hulls,
    nucleus_measurements,
    stain_optical_density,
)
from wsicell.segmentation.nuclei import segment_image
from wsicell.segmentation.stain import fit_stain_parameters

from conftest import TEST_DATA, TRAIN_SLIDE


@lru_cache(maxsize=1)
def _nuclei():
    rgb = np.asarray(Image.open(TEST_DATA / "BM_GRAZ_HE_0001_01.png").convert("RGB"))
    stain = fit_stain_parameters(rgb)
    nuclei, _ = segment_image(rgb, stain=stain)
    return nuclei, np.asarray(stain.stain_matrix)


def _props(masks, crops, matrix):
    od = stain_optical_density(crops, matrix)
    return [(regionprops(m.astype(np.uint8), intensity_image=od[i, :, :, 0])[0],
             regionprops(m.astype(np.uint8), intensity_image=od[i, :, :, 1])[0])
            for i, m in enumerate(masks)]


def test_measurements_equal_regionprops_on_real_masks():
    nuclei, matrix = _nuclei()
    assert len(nuclei) > 100
    pixel = np.full(len(nuclei), 0.4)
    measured = nucleus_measurements(nuclei.masks, nuclei.crops, matrix, pixel)
    assert list(measured) == MEASUREMENT_COLUMNS
    props = _props(nuclei.masks, nuclei.crops, matrix)
    expected = {
        "perimeter_um": [p.perimeter * 0.4 for p, _ in props],
        "major_axis_um": [p.axis_major_length * 0.4 for p, _ in props],
        "minor_axis_um": [p.axis_minor_length * 0.4 for p, _ in props],
        "eccentricity": [p.eccentricity for p, _ in props],
        "hematoxylin_od_mean": [p.intensity_mean for p, _ in props],
        "hematoxylin_od_std": [p.intensity_std for p, _ in props],
        "hematoxylin_od_min": [p.intensity_min for p, _ in props],
        "hematoxylin_od_max": [p.intensity_max for p, _ in props],
        "eosin_od_mean": [e.intensity_mean for _, e in props],
        "eosin_od_std": [e.intensity_std for _, e in props],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(measured[name], values, rtol=1e-4, atol=1e-4, err_msg=name)
    area = np.array([p.area for p, _ in props])
    np.testing.assert_allclose(measured["circularity"],
                               np.minimum(4 * np.pi * area / (measured["perimeter_um"] / 0.4) ** 2,
                                          1), rtol=1e-4)
    # regionprops' convex hull and Feret diameter are those of pixel *centres* (filled
    # pixels of the hull image, a contour through them); ours are those of the pixel squares
    # (QuPath's polygon outlines): the hull is larger by about half the perimeter, the
    # calipers by at most a pixel's diagonal
    solidity = np.array([p.solidity for p, _ in props])
    assert np.all(measured["solidity"] <= solidity + 1e-6)
    assert np.median(solidity - measured["solidity"]) < 0.1
    feret = np.array([p.feret_diameter_max for p, _ in props]) * 0.4
    assert np.all(np.abs(measured["max_caliper_um"] - feret) <= np.sqrt(2) * 0.4 + 1e-4)
    assert np.all(measured["min_caliper_um"] <= measured["max_caliper_um"] + 1e-6)
    assert np.all(measured["minor_axis_um"] <= measured["major_axis_um"] + 1e-4)
    # hematoxylin stains nuclei: their hematoxylin OD exceeds their eosin OD on average
    assert np.median(measured["hematoxylin_od_mean"]) > np.median(measured["eosin_od_mean"])


def test_calipers_of_hulls_equal_brute_force():
    nuclei, _ = _nuclei()
    masks = nuclei.masks[:200]
    hulls = convex_hulls(masks)
    longest, narrowest = calipers(hulls)
    for mask, hull, big, small in zip(masks, hulls, longest, narrowest):
        rows, cols = np.nonzero(mask)
        corners = np.concatenate([np.column_stack([cols + dx, rows + dy])
                                  for dx in (0, 1) for dy in (0, 1)]).astype(float)
        brute = shapely.MultiPoint(corners).convex_hull
        assert shapely.Polygon(hull).equals(brute)
        vertices = shapely.get_coordinates(brute)  # the farthest corners are hull vertices
        pairwise = np.linalg.norm(vertices[:, None] - vertices[None], axis=-1)
        assert big == pytest.approx(pairwise.max())
        # the narrowest width over many directions never goes below the exact one
        angles = np.linspace(0, np.pi, 3600, endpoint=False)
        projected = vertices @ np.stack([np.cos(angles), np.sin(angles)])
        widths = projected.max(axis=0) - projected.min(axis=0)
        assert small <= widths.min() + 1e-9
        assert small == pytest.approx(widths.min(), abs=0.02)


def test_empty_masks_give_nan():
    masks = np.zeros((2, 32, 32), bool)
    masks[1, 5:9, 5:9] = True
    crops = np.full((2, 32, 32, 3), 255, np.uint8)
    measured = nucleus_measurements(masks, crops, np.eye(3), np.array([0.5, 0.5]))
    assert all(np.isnan(v[0]) for v in measured.values())
    assert all(np.isfinite(v[1]) for v in measured.values())
    assert measured["solidity"][1] == 1.0 and measured["max_caliper_um"][1] == pytest.approx(
        np.hypot(2, 2))


def test_ingest_stores_the_measurements_of_its_masks(train_store):
    """Ingest measures every nucleus: the store's columns equal regionprops on the store's
    own masks and crops, in microns at each crop's scale (crop_px level-0 px of mpp um)."""
    root = open_store(train_store)
    cells = slide_cells(root, TRAIN_SLIDE)
    assert set(MEASUREMENT_COLUMNS) <= set(CELL_COLUMNS)
    masks, crops = slide_masks(root, TRAIN_SLIDE)[:], slide_crops(root, TRAIN_SLIDE)[:]
    attrs = slide_attrs(root, TRAIN_SLIDE)
    pixel = cells.crop_px.to_numpy(np.float64) * attrs["mpp"]
    props = _props(masks, crops, attrs["stain"]["stain_matrix"])
    np.testing.assert_allclose(cells.perimeter_um, [p.perimeter for p, _ in props] * pixel,
                               rtol=1e-4)
    np.testing.assert_allclose(cells.eccentricity, [p.eccentricity for p, _ in props],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cells.hematoxylin_od_mean, [p.intensity_mean for p, _ in props],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cells.eosin_od_mean, [e.intensity_mean for _, e in props],
                               rtol=1e-4, atol=1e-5)
    # the area column counts the nucleus at the segmentation's resolution; the mask of a
    # nucleus that fits its crop holds the same pixels
    fits = np.isclose(cells.crop_px.to_numpy() * attrs["mpp"], attrs["reference_mpp"])
    assert fits.mean() > 0.9
    np.testing.assert_allclose(cells.area[fits], masks[fits].sum(axis=(1, 2)) * pixel[fits] ** 2,
                               rtol=1e-4)
    assert np.isfinite(cells[MEASUREMENT_COLUMNS].to_numpy()).all()
