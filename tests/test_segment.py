"""Segmentation kernels, cell images, presets; parity with the HistomicsTK-composed recipe."""

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import skimage.measure
from conftest import TEST_DATA, bm_graz_images, htk_reference, shared_data_path

from wsicell.analysis.metrics import detection_score
from wsicell.config import (
    SegmentationConfig,
    StainConfig,
    WsicellConfig,
    segmentation_preset,
)
from wsicell.io.slide import read_rgb_image
from wsicell.segmentation import nuclei as segment
from wsicell.segmentation.stain import fit_stain_parameters


def disc(shape, centre, radius):
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


@pytest.mark.parametrize("density", [0.3, 0.45, 0.6, 0.9])
def test_fill_holes_matches_scipy(density):
    rng = np.random.default_rng(1)
    for shape in [(200, 300), (1, 7), (9, 1), (23, 17)]:
        mask = rng.random(shape) < density
        holes = scipy.ndimage.binary_fill_holes(mask) & ~mask
        np.testing.assert_array_equal(segment.fill_holes(mask), mask | holes)
        # holes up to 2 px only: a hole's size is its 4-connected pixel count
        labels, n = scipy.ndimage.label(holes)
        small = np.bincount(labels.ravel(), minlength=n + 1) <= 2
        small[0] = False
        np.testing.assert_array_equal(segment.fill_holes(mask, 2), mask | small[labels])


def test_more_labels_than_16_bits_hold():
    # 180,000 one-pixel holes, then 90,000 one-pixel objects: past 16-bit labels
    checkerboard = np.indices((600, 600)).sum(axis=0) % 2 == 0
    checkerboard[[0, -1], :] = checkerboard[:, [0, -1]] = True
    np.testing.assert_array_equal(segment.fill_holes(checkerboard),
                                  scipy.ndimage.binary_fill_holes(checkerboard))
    dots = np.zeros((600, 600), bool)
    dots[::2, ::2] = True
    dots[:40, :40] = True
    labels, n = scipy.ndimage.label(dots, structure=np.ones((3, 3)))
    assert n > 65535
    large = np.bincount(labels.ravel()) >= 2
    large[0] = False
    np.testing.assert_array_equal(segment.remove_small_objects(dots, 2), large[labels])


def test_remove_small_objects_keeps_large_only():
    mask = disc((100, 100), (30, 30), 10) | disc((100, 100), (80, 80), 3)
    kept = segment.remove_small_objects(mask, 100)
    np.testing.assert_array_equal(kept, disc((100, 100), (30, 30), 10))


def test_opening_separates_two_discs_joined_by_a_thin_bridge():
    mask = disc((80, 120), (40, 35), 15) | disc((80, 120), (40, 85), 15)
    mask[39:42, 35:85] = True  # 3 px wide bridge
    hematoxylin = np.where(mask, 50, 220).astype(np.uint8)
    labels = segment.segment_hematoxylin(hematoxylin, SegmentationConfig()).labels
    assert labels.max() == 2


def test_measure_nuclei_matches_regionprops():
    rgb = read_rgb_image(TEST_DATA / "BM_GRAZ_HE_0001_01.png")[:400, :400]
    params = fit_stain_parameters(rgb)
    normalised = params.normalise(rgb)
    hematoxylin = params.hematoxylin(normalised)
    config = SegmentationConfig()
    objects = segment.segment_hematoxylin(hematoxylin, config)
    labels = objects.labels
    nuclei = segment.measure_nuclei(objects, hematoxylin, normalised, config)
    from_labels = segment.Objects.from_labels(labels)
    for name in ("bbox", "area", "x", "y"):
        np.testing.assert_allclose(getattr(from_labels, name), getattr(objects, name))
    props = skimage.measure.regionprops(labels, intensity_image=hematoxylin)
    assert len(nuclei) == len(props) > 10
    np.testing.assert_allclose(nuclei.x, [p.centroid[1] for p in props])
    np.testing.assert_allclose(nuclei.y, [p.centroid[0] for p in props])
    np.testing.assert_array_equal(nuclei.area, [p.area for p in props])
    np.testing.assert_allclose(nuclei.mean_hematoxylin, [p.intensity_mean for p in props], rtol=1e-5)
    np.testing.assert_array_equal(nuclei.bbox, [[p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]] for p in props])
    assert nuclei.crops.shape == (len(props), 32, 32, 3) and nuclei.crops.dtype == np.uint8


def test_cell_crop_is_centred_on_white():
    region = np.full((10, 6, 3), 80, np.uint8)
    inside = np.ones((10, 6), bool)
    inside[0, 0] = False
    crop, mask = segment.cell_crop(region, inside, 32)
    nucleus = (crop != 255).any(axis=2)
    np.testing.assert_array_equal(mask, nucleus)
    rows, cols = np.nonzero(nucleus)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (11, 20, 13, 18)
    assert crop[11, 13].tolist() == [255, 255, 255]  # outside the mask: white
    assert crop[15, 15].tolist() == [80, 80, 80]


def test_cell_crop_shrinks_large_nuclei_keeping_aspect():
    region = np.full((64, 40, 3), 60, np.uint8)
    crop, mask = segment.cell_crop(region, np.ones((64, 40), bool), 32)
    rows, cols = np.nonzero((crop != 255).any(axis=2))
    assert rows.max() - rows.min() + 1 == 32
    assert cols.max() - cols.min() + 1 == 20
    np.testing.assert_array_equal(mask, (crop != 255).any(axis=2))


def test_crop_placement_maps_mask_pixels_back_onto_the_nucleus():
    labels = np.zeros((120, 120), np.int32)
    labels[30:40, 50:57] = 1  # fits: one crop pixel per image pixel
    yy, xx = np.mgrid[:120, :120]
    labels[((yy - 80) / 30) ** 2 + ((xx - 60) / 18) ** 2 <= 1] = 2  # 61 rows: shrunk
    bbox = np.array([[50, 30, 57, 40], [42, 50, 79, 111]])
    rgb = np.full((120, 120, 3), 90, np.uint8)
    _, masks = segment.cell_crops(labels, rgb, bbox, 32)
    origin, scale = segment.crop_placement(bbox, 32)
    for i in range(2):
        rows, cols = np.nonzero(masks[i])
        x = origin[i, 0] + (cols + 0.5) * scale[i]  # crop pixel centres, image pixels
        y = origin[i, 1] + (rows + 0.5) * scale[i]
        hits = labels[np.floor(y).astype(int), np.floor(x).astype(int)] == i + 1
        assert hits.mean() > 0.97
        area = masks[i].sum() * scale[i] ** 2
        assert abs(area - (labels == i + 1).sum()) < 0.08 * (labels == i + 1).sum()


def test_split_touching_separates_overlapping_discs():
    mask = disc((80, 120), (40, 45), 18) | disc((80, 120), (40, 75), 18)
    labels = segment.split_touching(mask, min_depth=1.5)
    assert labels.max() == 2
    assert (labels > 0).sum() == mask.sum()


def test_measuring_some_nuclei_and_concatenating_them_gives_all():
    rgb = read_rgb_image(TEST_DATA / "BM_GRAZ_HE_0001_01.png")[:300, :300]
    params = fit_stain_parameters(rgb)
    hematoxylin = params.hematoxylin_of(rgb)
    config = SegmentationConfig()
    objects = segment.segment_hematoxylin(hematoxylin, config)
    every = segment.measure_nuclei(objects, hematoxylin, rgb, config, params.normalise)
    first = np.arange(len(every)) < 3
    parts = [segment.measure_nuclei(objects, hematoxylin, rgb, config, params.normalise, which=w)
             for w in (first, ~first)]
    assert [len(p) for p in parts] == [3, len(every) - 3]
    joined = segment.Nuclei.concatenate(parts)
    for name in ("x", "y", "bbox", "area", "mean_hematoxylin", "crops", "masks"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(every, name))


def test_sensitive_preset_beats_paper_on_vendored_annotations():
    scores = {}
    for name in ("paper", "sensitive"):
        config = WsicellConfig(segmentation=segmentation_preset(name))
        total = None
        for image in sorted((TEST_DATA / "bm_graz" / "images").glob("*.png")):
            points = pd.read_csv(TEST_DATA / "bm_graz" / "dots" / f"{image.stem}.csv")
            nuclei, _ = segment.segment_image(read_rgb_image(image), config)
            score = detection_score(np.c_[nuclei.x, nuclei.y], points[["x", "y"]].to_numpy(), 12)
            total = score if total is None else total + score
        scores[name] = total.f1
    assert scores["paper"] > 0.75
    assert scores["sensitive"] > max(0.80, scores["paper"])


def test_tissue_preset_finds_the_colorectal_nuclei_the_paper_recipe_misses():
    import scipy.io

    from wsicell.segmentation.fov import segment_file

    data = shared_data_path("consep_patches")
    scores = {}
    for name in ("paper", "tissue"):
        config = WsicellConfig(segmentation=segmentation_preset(name))
        total = None
        for image in sorted((data / "images" / "test").glob("*.jpg"))[::25]:
            truth = scipy.io.loadmat(data / "type_mat" / "test" / f"{image.stem}.mat")
            found = segment_file(image, config, mpp=0.25).centroids()
            score = detection_score(found, truth["inst_centroid"].reshape(-1, 2), 16)  # 4 um
            total = score if total is None else total + score
        scores[name] = total
    assert scores["paper"].recall < 0.3
    assert scores["tissue"].recall > 2 * scores["paper"].recall
    assert scores["tissue"].f1 > 0.5 and scores["tissue"].precision > 0.6


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_foreground_mask_matches_histomicstk_on_bm_graz():
    """Hematoxylin foreground and nuclei equal the HistomicsTK-composed recipe's when the
    stains are fitted on all pixels; the default strided fit stays close."""
    ref = htk_reference()
    exact = WsicellConfig(stain=StainConfig(fit_max_pixels=0)).with_options("paper")
    threshold = exact.segmentation.hematoxylin_threshold
    pooled = {"foreground": [0, 0], "sampled_fit_nuclei": [0, 0]}
    for path in bm_graz_images():
        rgb = read_rgb_image(path)
        _, foreground_ref, labels_ref, _ = ref.htk_recipe(rgb)
        params = fit_stain_parameters(rgb, exact.stain)
        foreground = params.hematoxylin(params.normalise(rgb)) < threshold
        _, labels = segment.segment_image(rgb, exact)
        assert iou(labels > 0, labels_ref > 0) >= 0.99, path.name
        _, labels_sampled = segment.segment_image(rgb, WsicellConfig().with_options("paper"))
        for key, (a, b) in {"foreground": (foreground, foreground_ref),
                            "sampled_fit_nuclei": (labels_sampled > 0, labels_ref > 0)}.items():
            pooled[key][0] += (a & b).sum()
            pooled[key][1] += (a | b).sum()
    assert pooled["foreground"][0] / pooled["foreground"][1] >= 0.99
    assert pooled["sampled_fit_nuclei"][0] / pooled["sampled_fit_nuclei"][1] >= 0.97


def test_morphology_is_single_threaded_safe():
    """Kernels give the same labels whatever OpenCV's thread count (workers pin it to 1)."""
    hematoxylin = np.where(disc((300, 300), (150, 150), 40), 40, 230).astype(np.uint8)
    previous = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        one = segment.segment_hematoxylin(hematoxylin, SegmentationConfig()).labels
    finally:
        cv2.setNumThreads(previous)
    many = segment.segment_hematoxylin(hematoxylin, SegmentationConfig()).labels
    np.testing.assert_array_equal(one, many)


def test_vectorised_crops_equal_one_by_one():
    rgb = read_rgb_image(TEST_DATA / "BM_GRAZ_HE_0001_01.png")
    params = fit_stain_parameters(rgb)
    normalised = params.normalise(rgb)
    labels = segment.segment_hematoxylin(params.hematoxylin(normalised), SegmentationConfig()).labels
    boxes = scipy.ndimage.find_objects(labels)
    bbox = np.array([[c.start, r.start, c.stop, r.stop] for r, c in boxes])
    crops, masks = segment.cell_crops(labels, normalised, bbox, 32)
    large = np.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1]) > 32
    assert large.any() and (~large).any()  # both paths are exercised
    for i, box in enumerate(boxes):
        crop, mask = segment.cell_crop(normalised[box], labels[box] == i + 1, 32)
        np.testing.assert_array_equal(crops[i], crop)
        np.testing.assert_array_equal(masks[i], mask)
    edge = (bbox[:, 0] == 0) | (bbox[:, 1] == 0)
    assert edge.any()  # nuclei on the image border too
    assert ((bbox[:, 0] < 16) | (bbox[:, 2] > labels.shape[1] - 16)).any()  # windows cross it
    some = np.arange(0, len(bbox), 3)
    np.testing.assert_array_equal(segment.cell_crops(labels, normalised, bbox[some], 32,
                                                     ids=some + 1)[0], crops[some])
    # normalising only the nucleus pixels equals cutting from the normalised image
    np.testing.assert_array_equal(segment.cell_crops(labels, rgb, bbox, 32, params.normalise)[0],
                                  crops)
