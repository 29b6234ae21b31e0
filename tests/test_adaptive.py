"""The ``adaptive`` preset: its kernel on synthetic nuclei, its use on image files at their
native resolution; ``adaptive`` is the default, ``paper`` stays unchanged."""

import cv2
import numpy as np
import pytest
from conftest import TEST_DATA

from wsicell.config import (
    SEGMENTATION_PRESETS,
    AdaptiveConfig,
    SegmentationConfig,
    load_config,
)
from wsicell.segmentation.adaptive import (
    calibrate,
    fill_holes,
    hematoxylin_od,
    otsu_threshold,
    segment_hematoxylin_od,
)
from wsicell.segmentation.fov import segment_file
from wsicell.segmentation.nuclei import segment_hematoxylin
from wsicell.segmentation.stain import fit_stain_parameters

SAMPLE = TEST_DATA / "BM_GRAZ_HE_0001_01.png"


def _field(mpp: float, centres_um, radius_um: float = 3.0, side_um: float = 60.0):
    """Hematoxylin intensity (uint8, 0 = much stain) of dark disks on a pale background,
    drawn at ``mpp`` um/px (so the same tissue at two resolutions)."""
    side = round(side_um / mpp)
    h = np.full((side, side), 230, np.uint8)
    for x, y in centres_um:
        cv2.circle(h, (round(x / mpp), round(y / mpp)), round(radius_um / mpp), 60, -1)
    return h


CENTRES = [(10, 10), (45, 12), (12, 45), (30, 30), (48, 46), (25, 50)]


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_separate_nuclei_are_found_at_any_resolution(mpp):
    labels, refused = segment_hematoxylin_od(hematoxylin_od(_field(mpp, CENTRES)), mpp)
    assert labels.dtype == np.int32 and labels.max() == len(CENTRES) and len(refused) == 0
    radius = calibrate(hematoxylin_od(_field(mpp, CENTRES)), mpp).radius_um
    assert radius == pytest.approx(3.0, abs=0.4)  # the disks' inscribed radius, in um


def test_touching_nuclei_are_split():
    centres = [(20, 20), (25.5, 20), (45, 45), (10, 50), (50, 10), (35, 8)]
    labels, _ = segment_hematoxylin_od(hematoxylin_od(_field(0.25, centres)), 0.25)
    assert labels.max() == len(centres)  # the pair overlapping by 0.5 um is cut in two


def test_too_large_objects_are_refused_and_counted():
    h = _field(0.25, CENTRES, side_um=100)
    cv2.rectangle(h, (280, 40), (320, 360), 40, -1)  # a 10 x 80 um band: one object
    labels, refused = segment_hematoxylin_od(hematoxylin_od(h), 0.25)
    assert labels[200, 300] == 0 and labels.max() == len(CENTRES)
    np.testing.assert_allclose(refused, [[300, 200]], atol=1.0)  # where it was, (x, y) px
    labels, refused = segment_hematoxylin_od(hematoxylin_od(h), 0.25,
                                             AdaptiveConfig(max_area_um2=1000))
    assert len(refused) == 0 and labels[200, 300] > 0


def test_fill_holes_fills_small_enclosed_holes_only():
    mask = np.zeros((40, 60), np.uint8)
    mask[2:12, 2:12] = 1
    mask[5:8, 5:8] = 0  # a 9-pixel hole
    mask[15:35, 15:35] = 1
    mask[18:32, 18:32] = 0  # a 196-pixel hole
    mask[0:10, 40:50] = 1
    mask[0:4, 43:46] = 0  # a notch open to the border: not a hole
    mask[20:30, 45:55] = 1
    mask[24, 49] = 0  # a 1-pixel hole ...
    mask[25, 50] = 0  # ... and a diagonal neighbour: two 4-connected holes
    filled = fill_holes(mask, 9)
    assert filled[5:8, 5:8].all() and filled[24, 49] and filled[25, 50]
    assert not filled[18:32, 18:32].any() and not filled[0:4, 43:46].any()
    assert (filled >= mask).all() and filled.dtype == np.uint8
    assert (fill_holes(mask, 196)[18:32, 18:32] == 1).all()
    assert not fill_holes(np.zeros((5, 5), np.uint8), 10).any()


def test_an_image_without_foreground_gives_no_nuclei():
    labels, refused = segment_hematoxylin_od(np.zeros((64, 64), np.float32), 0.4)
    assert labels.shape == (64, 64) and not labels.any() and refused.shape == (0, 2)


def test_otsu_threshold_separates_two_levels():
    values = np.r_[np.full(100, 0.1), np.full(50, 0.7)].astype(np.float32)
    assert 0.1 < otsu_threshold(values) <= 0.7


def test_adaptive_is_the_default_and_paper_is_unchanged():
    assert load_config().segmentation == SEGMENTATION_PRESETS["adaptive"]
    assert SEGMENTATION_PRESETS["adaptive"].method == "adaptive"
    assert SEGMENTATION_PRESETS["paper"] == SegmentationConfig(preset="paper")
    assert SEGMENTATION_PRESETS["paper"].method == "threshold"
    assert SEGMENTATION_PRESETS["paper"].hematoxylin_threshold == 120


def test_the_threshold_kernel_refuses_an_adaptive_configuration():
    with pytest.raises(ValueError, match="threshold recipe"):
        segment_hematoxylin(np.full((8, 8), 200, np.uint8), SEGMENTATION_PRESETS["adaptive"])


def test_image_file_at_native_resolution():
    config = load_config(None, "adaptive")
    coarse = segment_file(SAMPLE, config, mpp=0.4)  # at the reference: no resampling
    assert coarse.native_labels is None and coarse.file_labels().shape == (1200, 1200)
    fine = segment_file(SAMPLE, config, mpp=0.25)  # finer: segmented at 0.25 um/px
    assert fine.native_labels.shape == (1200, 1200)
    assert fine.labels.shape == (750, 750)  # measured and cut on the reference grid
    assert fine.nuclei.crops.shape[1:] == (32, 32, 3)
    assert len(fine.nuclei) == fine.native_labels.max() > 100
    xy = fine.centroids()
    assert (xy >= -1).all() and (xy <= 1200).all()
    assert len(fine.table()) == len(fine.nuclei)


def test_reference_labels_come_back_to_the_file_grid():
    from wsicell.analysis.metrics import label_centroids

    found = segment_file(SAMPLE, load_config(), mpp=0.25)  # paper: segmented at 0.4 um/px
    labels = found.file_labels()
    assert labels.shape == (1200, 1200) and labels.max() == len(found.nuclei)
    np.testing.assert_allclose(label_centroids(labels), found.centroids(), atol=1.0)


def test_segment_command_with_adaptive(tmp_path):
    import json
    import subprocess
    import sys

    from PIL import Image

    Image.open(SAMPLE).crop((300, 300, 600, 600)).save(tmp_path / "field.png")
    result = subprocess.run([sys.executable, "-m", "wsicell.cli.main", "segment",
                             str(tmp_path / "field.png"), "--out", str(tmp_path / "out"),
                             "--preset", "adaptive", "--mpp", "0.25", "--no-progress"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    run = json.loads((tmp_path / "out" / "field" / "run.json").read_text())
    assert run["config"]["segmentation"]["method"] == "adaptive"
    assert run["n_cells"] > 10 and run["n_refused"] >= 0
    assert np.load(tmp_path / "out" / "field" / "crops.npy").shape[1:] == (32, 32, 3)


def test_stain_noise_without_nuclei_gives_almost_no_objects():
    rng = np.random.default_rng(0)
    pink = (np.array([235, 150, 200]) + rng.normal(0, 8, (500, 600, 3))).clip(0, 255)
    od = hematoxylin_od(fit_stain_parameters(pink.astype(np.uint8)).hematoxylin_of(
        pink.astype(np.uint8)))
    assert segment_hematoxylin_od(od, 0.4)[0].max() <= 20
    # either the prior core threshold (the field has no hematoxylin mode) or the peak-contrast
    # test alone keeps it clean; Otsu alone splits the noise into ~2,000 "nuclei"
    assert segment_hematoxylin_od(od, 0.4, AdaptiveConfig(prior_threshold=0))[0].max() <= 20
    assert segment_hematoxylin_od(od, 0.4, AdaptiveConfig(min_peak_contrast=0))[0].max() <= 20
    assert segment_hematoxylin_od(od, 0.4, AdaptiveConfig(
        min_peak_contrast=0, prior_threshold=0))[0].max() > 1000


def _pieces_per_label(labels):
    from skimage.measure import label

    return label(labels, background=0, connectivity=1).max(), len(np.unique(labels[labels > 0]))


def test_every_nucleus_is_one_connected_region_with_one_outline():
    """The nearest-marker split and diagonal contacts leave no nucleus in pieces: each label
    is 4-connected and its exported outline a single Polygon."""
    from wsicell.io.export import mask_outline

    rgb = cv2.cvtColor(cv2.imread(str(SAMPLE)), cv2.COLOR_BGR2RGB)
    hematoxylin = fit_stain_parameters(rgb, load_config().stain).hematoxylin_of(rgb)
    labels, _ = segment_hematoxylin_od(hematoxylin_od(hematoxylin), 0.4)
    n_pieces, n_labels = _pieces_per_label(labels)
    assert n_labels > 500 and n_pieces == n_labels
    boxes = _boxes(labels)
    assert all(mask_outline(labels[box] == i + 1).geom_type == "Polygon"
               for i, box in enumerate(boxes) if box is not None)
    # the stored crop masks too, shrunk ones included (16 px crops shrink most nuclei)
    from wsicell.segmentation.nuclei import Objects, cell_crops

    objects = Objects.from_labels(labels)
    _, masks = cell_crops(labels, rgb, objects.bbox, 16)
    assert all(mask_outline(m).geom_type == "Polygon" for m in masks if m.any())


def _boxes(labels):
    from scipy import ndimage

    return ndimage.find_objects(labels)


def test_one_piece_each_keeps_the_seeded_piece_of_each_label():
    from wsicell.segmentation.adaptive import one_piece_each

    labels = np.zeros((6, 9), np.int32)
    labels[1:5, 1:4] = 1
    labels[1:5, 4:7] = 2
    labels[2, 4] = 1  # a pixel of 1 inside 2, 4-connected to 1's seeded piece: stays
    labels[4, 6] = 1  # a piece of 1 cut off by 2: background
    labels[0, 8] = 2  # a piece of 2 apart from its seed: background
    seeds = np.zeros(labels.shape, bool)
    seeds[2, 2] = seeds[3, 5] = True
    out = one_piece_each(labels, seeds)
    assert out[2, 4] == 1 and out[4, 6] == 0 and out[0, 8] == 0
    assert (out[labels != out] == 0).all() and _pieces_per_label(out) == (2, 2)


# nucleus-free 48 x 48 um fat and background fields of SAMPLE (no annotated nucleus centre
# within 8 um; benchmarks/negative_regions.csv lists them with the other dev images')
FAT_FIELDS = [(320, 0), (440, 0), (720, 0), (840, 0), (600, 240), (920, 320), (1040, 320),
              (1000, 440), (1040, 640), (1080, 760), (400, 880), (280, 920), (680, 1000),
              (1080, 1000)]


def test_fat_only_fields_give_almost_no_nucleus(tmp_path):
    """Each field is a file of its own that calibrates itself: the colour normalisation no
    longer stretches a nucleus-free field's noise into stain (79 objects in the 14 fields
    without the gain limit, 15 with it when measured)."""
    rgb = cv2.imread(str(SAMPLE))
    config = load_config()
    unlimited = config.with_options(segmentation={"adaptive": config.segmentation.adaptive
                                                  .model_copy(update={"max_stain_gain": 0.0})})
    found = {"default": 0, "unlimited": 0}
    for x, y in FAT_FIELDS:
        path = tmp_path / f"fat_{x}_{y}.png"
        cv2.imwrite(str(path), rgb[y:y + 120, x:x + 120])
        for name, c in (("default", config), ("unlimited", unlimited)):
            found[name] += len(segment_file(path, c, 0.4, allow_empty=True).nuclei)
    assert found["default"] <= 25 and found["unlimited"] > 3 * found["default"]


def _regions_found(tmp_path, image, mpp, boxes):
    """Nuclei the default recipe finds in each nucleus-free box ``(x0, y0, x1, y1)`` of
    ``image``, each segmented as a field of its own (it calibrates itself)."""
    from PIL import Image

    from wsicell.io.slide import read_rgb_image

    rgb = read_rgb_image(image)
    found = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        path = tmp_path / f"region_{i}.png"
        Image.fromarray(rgb[y0:y1, x0:x1]).save(path)
        found.append(len(segment_file(path, load_config(), mpp, allow_empty=True).nuclei))
    return found


def test_fat_only_fields_give_no_nucleus(tmp_path):
    """The fat and glass of BM_GRAZ_HE_0001_01 (benchmarks/negative_regions.csv; 48 x 48 um
    each) have no hematoxylin mode: objects need a core over the prior threshold, and the
    fitted hematoxylin vector gives way to the reference (15 objects before, in 10 of the
    14 fields)."""
    fat = [(320, 0, 440, 120), (440, 0, 560, 120), (840, 0, 960, 120), (1040, 320, 1160, 440),
           (1000, 440, 1120, 560), (1040, 640, 1160, 760), (400, 880, 520, 1000),
           (280, 920, 400, 1040), (1080, 1000, 1200, 1120)]
    glass = [(720, 0, 840, 120), (600, 240, 720, 360), (920, 320, 1040, 440),
             (1080, 760, 1200, 880), (680, 1000, 800, 1120)]
    assert sum(_regions_found(tmp_path, SAMPLE, 0.4, fat + glass)) <= 1


def test_blood_only_fields_give_no_nucleus(tmp_path):
    """Red-cell masses of CoNSeP (benchmarks/negative_regions.csv) are eosin-dominated:
    110 objects in these five fields before, about one per red cell."""
    from conftest import shared_data_path

    images = shared_data_path("consep_patches", "images", "train")
    found = [n for name, box in [("train_15_005", (0, 0, 192, 192)),
                                 ("train_15_013", (0, 64, 192, 256)),
                                 ("train_15_014", (0, 0, 192, 192)),
                                 ("train_27_002", (0, 0, 192, 192)),
                                 ("train_27_003", (0, 64, 192, 256))]
             for n in _regions_found(tmp_path, images / f"{name}.jpg", 0.25, [box])]
    assert sum(found) <= 2


def test_eosin_dominated_objects_are_dropped():
    """Two equally dark disks; the one whose eosin exceeds half its hematoxylin (a red
    cell) is dropped, unless the test is off or no eosin is given (grayscale)."""
    h = _field(0.25, [(15, 30), (45, 30)])
    od = hematoxylin_od(h)
    eosin = np.where(np.arange(h.shape[1])[None, :] > h.shape[1] // 2, od * 0.8, od * 0.1)
    eosin = eosin.astype(np.float32)
    assert segment_hematoxylin_od(od, 0.25, eosin_od=eosin)[0].max() == 1
    assert segment_hematoxylin_od(od, 0.25, AdaptiveConfig(max_eosin_ratio=0),
                                  eosin_od=eosin)[0].max() == 2
    assert segment_hematoxylin_od(od, 0.25)[0].max() == 2


def test_specks_of_a_coarser_source_image_are_dropped():
    # 1.6 um disks (8 um2): the calibrated radius is theirs, so min_area_rel keeps them at
    # 0.4 um/px; drawn from a 0.5 um/px source, they are under 40 of its pixels (10 um2)
    od = hematoxylin_od(_field(0.4, CENTRES, radius_um=1.6))
    assert segment_hematoxylin_od(od, 0.4)[0].max() == len(CENTRES)
    assert segment_hematoxylin_od(od, 0.4, source_mpp=0.4)[0].max() == len(CENTRES)
    assert segment_hematoxylin_od(od, 0.4, source_mpp=0.5)[0].max() == 0
    assert segment_hematoxylin_od(od, 0.4, AdaptiveConfig(min_source_px=0),
                                  source_mpp=0.5)[0].max() == len(CENTRES)


def test_cmu1_keratin_and_dermis_give_no_object_under_10_um2():
    from conftest import shared_data_path

    from wsicell.io.slide import ReferenceGrid, open_slide, read_reference_region

    slide = open_slide(shared_data_path("slides", "CMU-1-Small-Region.svs"))
    grid = ReferenceGrid.of(slide, slide.mpp, 0.4)
    # level-0 (900, 1150)-(1650, 1800): keratin flakes, epidermis and dermis
    rgb = read_reference_region(slide, grid, 1122, 1435, 936, 811)
    p = AdaptiveConfig()
    stain = fit_stain_parameters(rgb, load_config(None, "adaptive").stain, **p.stain_fit)
    hematoxylin, eosin = (hematoxylin_od(s) for s in stain.stains_of(rgb))
    areas = {}
    for source_mpp in (None, slide.mpp):
        labels, _ = segment_hematoxylin_od(hematoxylin, 0.4, p, eosin_od=eosin,
                                           source_mpp=source_mpp)
        areas[source_mpp] = np.bincount(labels.ravel())[1:] * 0.4 ** 2
    assert slide.mpp == pytest.approx(0.499)
    assert (areas[None] < 10).mean() > 0.05  # the 20x image's specks and slivers
    assert len(areas[slide.mpp]) > 0.7 * len(areas[None])  # 778 -> 600
    assert (areas[slide.mpp] >= 10 - 1e-6).all()


def test_pale_centres_of_large_nuclei_are_filled():
    # bm_graz: large vesicular nuclei whose pale chromatin leaves a 30-62 um2 hole
    rgb = cv2.cvtColor(cv2.imread(str(SAMPLE)), cv2.COLOR_BGR2RGB)
    p = AdaptiveConfig()
    stain = fit_stain_parameters(rgb, load_config(None, "adaptive").stain, **p.stain_fit)
    hematoxylin, eosin = (hematoxylin_od(s) for s in stain.stains_of(rgb))
    labels = segment_hematoxylin_od(hematoxylin, 0.4, p, eosin_od=eosin)[0]
    before = segment_hematoxylin_od(hematoxylin, 0.4, AdaptiveConfig(max_hole_um2=30),
                                    eosin_od=eosin)[0]
    n, filled, stats, _ = cv2.connectedComponentsWithStats(
        ((labels > 0) & (before == 0)).astype(np.uint8), connectivity=4)
    centres = stats[1:, cv2.CC_STAT_AREA] * 0.4 ** 2 > 30
    assert centres.sum() >= 8  # holes over 30 um2, now inside their nucleus
    assert abs(int(labels.max()) - int(before.max())) <= 2  # the same nuclei, whole


def test_nuclei_dropped_in_pieces_are_rejoined_at_a_lower_threshold():
    """CoNSeP train_23_014 (0.25 um/px, 154 nuclei): pale nuclei whose chromatin clears the
    threshold only in specks under the area floor.  ``rejoin_threshold_rel`` finds them
    as whole objects at half the threshold and leaves the first pass's objects as they
    are (detection within 3 um: 83 -> 100 of 154, no more false positives)."""
    from conftest import shared_data_path

    from wsicell.analysis.metrics import detection_score, label_centroids

    rgb = cv2.cvtColor(cv2.imread(str(shared_data_path(
        "consep_patches", "images", "train", "train_23_014.jpg"))), cv2.COLOR_BGR2RGB)
    truth = cv2.imread(str(shared_data_path(
        "consep_patches", "instances", "train", "train_23_014.png")), -1).astype(np.int32)
    p = AdaptiveConfig()
    stain = fit_stain_parameters(rgb, load_config(None, "adaptive").stain, **p.stain_fit)
    hematoxylin, eosin = (hematoxylin_od(s) for s in stain.stains_of(rgb))
    before = segment_hematoxylin_od(hematoxylin, 0.25, p, eosin_od=eosin)[0]
    after = segment_hematoxylin_od(hematoxylin, 0.25, p.model_copy(
        update={"rejoin_threshold_rel": 0.5}), eosin_od=eosin)[0]
    n = int(before.max())
    assert np.array_equal(np.where(after <= n, after, 0), before)  # the first pass, as it was
    added = np.where(after > n, after, 0)
    assert int(added.max()) - n == len(np.unique(added)) - 1 >= 10
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    for i in np.unique(added)[1:]:  # each one region, no side shared with a first object
        region = (added == i).astype(np.uint8)
        assert cv2.connectedComponents(region, connectivity=4)[0] == 2
        assert not (cv2.dilate(region, cross) & (before > 0)).any()
    score = {name: detection_score(label_centroids(lab), label_centroids(truth), 12.0)
             for name, lab in (("before", before), ("after", after))}
    assert score["after"].true_positives >= score["before"].true_positives + 10
    assert score["after"].precision >= score["before"].precision - 0.02


def test_meshes_of_thin_lamellae_are_dropped_and_clumps_kept():
    """A net of dark lamellae (keratin, collagen) is one large, sprawling component: the
    split cuts it into nucleus-sized pieces, which the mesh test drops; a clump of
    touching nuclei and single nuclei beside it stay."""
    h = np.full((400, 400), 230, np.uint8)
    for k in range(10, 210, 40):  # 2.4 um wide lamellae, 16 um apart, at 0.4 um/px
        cv2.line(h, (k, 10), (k, 390), 60, 6)
        cv2.line(h, (10, k), (190, k), 60, 6)
    for x, y in [(260, 60), (275, 60), (260, 75), (275, 75),  # a clump
                 (250, 200), (320, 200), (250, 300), (330, 320)]:
        cv2.circle(h, (x, y), 8, 60, -1)
    od = hematoxylin_od(h)

    def objects_left_and_right(p):
        labels, _ = segment_hematoxylin_od(od, 0.4, p)
        on_left = np.unique(labels[:, :200])
        return len(on_left[on_left > 0]), len(np.unique(labels[:, 200:])) - 1

    assert objects_left_and_right(AdaptiveConfig()) == (0, 5)
    net_pieces, nuclei = objects_left_and_right(AdaptiveConfig(mesh_area_rel=0))
    assert net_pieces > 5 and nuclei == 5


def test_cmu1_keratin_lamellae_are_mostly_dropped():
    """CMU-1 (skin, 20x): the default outlines half as many objects in the keratin flakes
    as without the mesh test, and the same nuclei in the dermis."""
    from conftest import shared_data_path

    path = shared_data_path("slides", "CMU-1-Small-Region.svs")
    counts = {}
    for mesh in (30.0, 0.0):
        config = load_config(None, "adaptive", segmentation={"adaptive": AdaptiveConfig(
            mesh_area_rel=mesh).model_dump()})
        x, y = segment_file(path, config).centroids().T  # level-0 px
        rows = (y > 1150) & (y < 1850)
        counts[mesh] = (rows & (x > 1250) & (x < 1600)).sum(), (rows & (x > 900) & (x < 1100)).sum()
    (keratin, dermis), (keratin_before, dermis_before) = counts[30.0], counts[0.0]
    assert keratin < 0.6 * keratin_before  # 503 -> 245
    assert dermis >= 0.98 * dermis_before  # 247 -> 247
