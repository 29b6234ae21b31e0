"""The ``adaptive`` nuclei recipe: weight-free, self-calibrating, sizes in microns.

Pure functions on a hematoxylin optical-density image at its own resolution (``mpp``
microns per pixel); every size of :class:`wsicell.config.AdaptiveConfig` is converted with
it, so the recipe holds at 20x and 40x alike.

1. Optical density ``od = log(256 / (h + 1)) / log(256)`` (0..1) of the hematoxylin
   intensity ``h`` (uint8, 0 = much stain; :func:`hematoxylin_od`).
2. Gaussian smoothing (``smooth_um``) and local background removal: a white top-hat by a
   disk of ``tophat_radius_um``, computed on a copy shrunk so that the disk is ~5 px
   (:func:`local_background`).
3. Calibration on the image (or pooled over several, :func:`calibrate`): threshold =
   Otsu's threshold of the top-hat OD x ``threshold_scale``; where the field has no
   hematoxylin mode (fewer than ``min_mode_share`` of its pixels reach
   ``prior_threshold``: :func:`field_threshold`) the prior becomes a core threshold that
   every object must pass over ``min_area_um2``; nucleus radius = median largest
   inscribed radius of the foreground components, clamped to ``radius_range_um``.
4. Foreground: top-hat OD > threshold, holes up to ``max_hole_um2`` filled.
5. Split: markers are regional maxima (within ``marker_radius_rel`` x radius) of the
   distance transform smoothed by ``marker_sigma_rel`` x radius, at least
   ``min_marker_rel`` x radius from the background; a component with two or more markers
   gives each pixel to its nearest marker.
6. Objects under max(``min_area_um2``, ``min_area_rel`` x radius^2, ``min_source_px``
   pixels of the source image where that is coarser than ``mpp``), whose highest
   contrast is under ``min_peak_contrast``, with less than ``min_area_um2`` over the
   core threshold (fields without a hematoxylin mode) or whose eosin OD over hematoxylin OD exceeds
   ``max_eosin_ratio`` (:func:`eosin_ratio`) are dropped; objects over ``max_area_um2``
   are refused (removed and counted, never silently).
7. Optionally (``rejoin_threshold_rel``, off by default), nuclei dropped in pieces are
   looked for again at a lower threshold (:func:`rejoin_mask`), split as in 5 and put
   through the tests of 6.

OpenCV / numpy only; ~0.06-0.09 s per megapixel single-threaded at 0.25 um/px, about
0.066 s/MP on the benchmark slide's tiles at 0.4 um/px (docs/segmentation.md,
"The default: adaptive", and docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from wsicell.config import AdaptiveConfig

_OD_U8 = (np.log(256.0 / (np.arange(256) + 1.0)) / np.log(256.0)).astype(np.float32)


@dataclass(frozen=True)
class Calibration:
    """What an image (or a slide) tells the recipe about itself.

    Attributes
    ----------
    threshold : float
        Foreground threshold of the smoothed top-hat hematoxylin OD (0..1).
    radius_um : float
        Typical nucleus radius (largest inscribed circle), microns.
    core_threshold : float
        Contrast that every object must exceed over ``min_area_um2`` (the prior threshold
        where the field has no hematoxylin mode, :func:`field_threshold`); 0: none.
    """

    threshold: float
    radius_um: float
    core_threshold: float = 0.0


def hematoxylin_od(hematoxylin: np.ndarray) -> np.ndarray:
    """Optical density (0..1, float32) of a hematoxylin intensity image (uint8, 0 = much
    stain), same shape."""
    return cv2.LUT(np.ascontiguousarray(hematoxylin, dtype=np.uint8), _OD_U8)


def otsu_threshold(values: np.ndarray, bins: int = 256, lo: float = 0.0, hi: float = 1.0
                   ) -> float:
    """Otsu's threshold of float values clipped to [lo, hi] (histogram of ``bins`` bins)."""
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, 1)
    hist = cv2.calcHist([np.clip(v, lo, hi)], [0], None, [bins], [lo, hi + 1e-6]).ravel()
    hist = hist.astype(np.float64)
    centres = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    return float(lo + (k + 1) * (hi - lo) / bins)


def _disk(radius_px: float) -> np.ndarray:
    r = max(round(radius_px), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def contrast(od: np.ndarray, mpp: float, p: AdaptiveConfig) -> np.ndarray:
    """Smoothed, background-removed hematoxylin OD: (H, W) float32 -> (H, W) float32."""
    s = p.smooth_um / mpp
    sm = cv2.GaussianBlur(od, (0, 0), s) if s > 0.3 else od
    if p.tophat_radius_um > 0:
        sm = sm - local_background(sm, p.tophat_radius_um / mpp)
    return sm


def background_block(radius_px: float) -> int:
    """Side (pixels) of the blocks :func:`local_background` averages for a disk of
    ``radius_px``: images whose origins lie on multiples of it (a slide's tiles and the
    whole slide) get the same background wherever the disk stays inside both."""
    return max(int(radius_px // 5), 1)


def local_background(image: np.ndarray, radius_px: float) -> np.ndarray:
    """Grey opening of a float32 (H, W) image by a disk, computed on a copy shrunk by an
    integer factor (:func:`background_block`; area averaging of whole blocks, the image
    padded by edge replication to a multiple of it) so that the disk is about 5 px in
    radius, then enlarged back by the same factor (bilinear): the background is smooth at
    that scale and a large disk opening costs ~40x more."""
    f = background_block(radius_px)
    if f == 1:
        return cv2.morphologyEx(image, cv2.MORPH_OPEN, _disk(radius_px))
    h, w = image.shape
    padded = cv2.copyMakeBorder(image, 0, -h % f, 0, -w % f, cv2.BORDER_REPLICATE)
    small = cv2.resize(padded, (padded.shape[1] // f, padded.shape[0] // f),
                       interpolation=cv2.INTER_AREA)
    small = cv2.morphologyEx(small, cv2.MORPH_OPEN, _disk(radius_px / f))
    return cv2.resize(small, (padded.shape[1], padded.shape[0]),
                      interpolation=cv2.INTER_LINEAR)[:h, :w]


def fill_holes(mask: np.ndarray, max_hole_px: int) -> np.ndarray:
    """Fill background components (4-connected) of at most ``max_hole_px`` pixels that do
    not touch the border.  ``mask`` (H, W) uint8 0/1; returns the same type.

    The background reached from the border is flooded away first (one ``cv2.floodFill`` on
    the mask framed by background), so that only the holes, a few pixels, are labelled and
    counted: ~3x cheaper than labelling the whole background with its statistics.

    Examples
    --------
    >>> ring = np.pad(np.ones((5, 5), np.uint8), 1)
    >>> ring[3, 3] = 0
    >>> int(fill_holes(ring, 1)[3, 3]), int(fill_holes(ring, 0)[3, 3])
    (1, 0)
    """
    holes = cv2.copyMakeBorder((mask == 0).view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT,
                               value=1)
    cv2.floodFill(holes, None, (0, 0), 0, flags=4)
    holes = holes[1:-1, 1:-1]
    n, hole_labels = cv2.connectedComponentsWithAlgorithm(holes, 4, cv2.CV_32S, cv2.CCL_GRANA)
    out = mask.copy()
    if n > 1:
        pixels = np.flatnonzero(holes.view(bool))  # numpy's fast path: bool, not uint8
        label = hole_labels.ravel()[pixels]
        small = np.bincount(label, minlength=n) <= max_hole_px
        out.ravel()[pixels[small[label]]] = 1
    return out


def foreground(con: np.ndarray, mpp: float, threshold: float, p: AdaptiveConfig) -> np.ndarray:
    """Nucleus foreground (H, W) uint8 0/1 of a contrast image (:func:`contrast`)."""
    mask = (con > threshold).astype(np.uint8)
    return fill_holes(mask, int(p.max_hole_um2 / mpp ** 2))


@dataclass
class _Components:
    """4-connected components of a mask (one polygon outline each) and its distance
    transform, computed once; areas and boxes from the foreground pixels only (OpenCV's
    statistics pass over the whole image cost as much as the labelling)."""

    n: int
    mask: np.ndarray       #: (H, W) uint8 0/1, the mask labelled
    labels: np.ndarray     #: (H, W) int32, 0 = background
    pixels: np.ndarray     #: (P,) int64, flat indices of the foreground
    label: np.ndarray      #: (P,) int32, their component
    area: np.ndarray       #: (n,) int64, pixels per component (0 for the background)
    dist: np.ndarray       #: (H, W) float32, pixels to the background

    @classmethod
    def of(cls, mask: np.ndarray) -> "_Components":
        n, labels = cv2.connectedComponentsWithAlgorithm(mask, 4, cv2.CV_32S, cv2.CCL_GRANA)
        pixels = np.flatnonzero(mask.view(bool))  # numpy's fast path: bool, not uint8
        label = labels.ravel()[pixels]
        return cls(n, mask, labels, pixels, label, np.bincount(label, minlength=n),
                   cv2.distanceTransform(mask, cv2.DIST_L2, 5))

    def boxes(self, ids: np.ndarray) -> np.ndarray:
        """``(x, y, w, h)`` of the components ``ids``: (len(ids), 4) int64."""
        where = np.full(self.n, -1, dtype=np.int64)
        where[ids] = np.arange(len(ids))
        chosen = where[self.label]
        at = chosen >= 0
        rows, cols = np.divmod(self.pixels[at], self.labels.shape[1])
        lo = np.full((len(ids), 2), np.iinfo(np.int64).max)
        hi = np.full((len(ids), 2), -1)
        np.minimum.at(lo, chosen[at], np.column_stack([cols, rows]))
        np.maximum.at(hi, chosen[at], np.column_stack([cols, rows]))
        return np.column_stack([lo, hi - lo + 1])


def _inscribed_radii(c: _Components, mpp: float, p: AdaptiveConfig) -> np.ndarray:
    """Largest inscribed radius (um) of each component of at least
    ``p.radius_min_area_um2``."""
    ok = c.area * mpp ** 2 >= p.radius_min_area_um2
    ok[0] = False
    if c.n < 2 or not ok.any():
        return np.zeros(0)
    return _label_max(c.dist.ravel()[c.pixels], c.label, c.n)[ok] * mpp


def _typical_radius(radii: np.ndarray, p: AdaptiveConfig) -> float:
    if len(radii) < 5:
        return p.radius_prior_um
    lo, hi = p.radius_range_um
    return float(np.clip(np.median(radii), lo, hi))


def _label_max(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Maximum of ``values`` (P,) float32 over the pixels of each label 0..n-1 of
    ``labels`` (P,) int: (n,) float32 (0 for labels without pixels)."""
    out = np.zeros(n, dtype=np.float32)
    np.maximum.at(out, labels, values)
    return out


def calibrate(ods, mpp: float, p: AdaptiveConfig | None = None) -> Calibration:
    """Calibrate threshold and nucleus scale on one OD image or on a list of them (a
    slide's tiles or an image's patches, pooled).

    Parameters
    ----------
    ods : ndarray (H, W) float32 or list of them
        Hematoxylin OD (:func:`hematoxylin_od`).
    mpp : float
        Microns per pixel.
    p : AdaptiveConfig, optional
        Default: the `adaptive` preset's parameters.
    """
    p = p or AdaptiveConfig()
    ods = [ods] if isinstance(ods, np.ndarray) else list(ods)
    return _calibrated([contrast(o, mpp, p) for o in ods], mpp, p)[0]


def field_threshold(values: np.ndarray, p: AdaptiveConfig) -> tuple[float, float]:
    """The foreground and core thresholds of a field's (or a slide's pooled) contrast.

    Foreground: Otsu's threshold x ``p.threshold_scale``, never under
    ``p.min_threshold``.  Where the field has no hematoxylin mode, fewer than
    ``p.min_mode_share`` of its values above ``p.prior_threshold`` (fat, blood, stroma or
    glass alone: Otsu's threshold then splits membranes, red cells or noise from the
    rest), ``p.prior_threshold`` becomes the core threshold: an object is kept only with
    ``p.min_area_um2`` over it (hysteresis; raising the foreground threshold itself
    instead shrank the nuclei of sparse fields, CoNSeP AJI -0.016).

    Parameters
    ----------
    values : ndarray, float32
        Top-hat hematoxylin optical density (:func:`contrast`), any shape.
    p : AdaptiveConfig

    Returns
    -------
    threshold, core_threshold : float
        Top-hat optical density (0..1); core 0 where the field has a hematoxylin mode.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> fat = np.abs(rng.normal(0, 0.03, 10_000)).astype(np.float32)  # no nucleus
    >>> p = AdaptiveConfig()
    >>> [round(t, 2) for t in field_threshold(fat, p)]
    [0.03, 0.2]
    >>> tissue = np.concatenate([fat, np.full(1_000, 0.3, np.float32)])  # 9% nuclei
    >>> field_threshold(tissue, p) == (otsu_threshold(tissue), 0.0)
    True
    """
    t = max(otsu_threshold(values) * p.threshold_scale, p.min_threshold)
    no_mode = p.prior_threshold > 0 and \
        np.count_nonzero(values > p.prior_threshold) < p.min_mode_share * values.size
    return t, p.prior_threshold if no_mode else 0.0


def _calibrated(cons: list, mpp: float, p: AdaptiveConfig
                ) -> tuple[Calibration, list]:
    """Threshold (:func:`field_threshold` of the pooled contrast) and nucleus radius of
    contrast images, and the components of each one's foreground."""
    t, core = field_threshold(np.concatenate([c[::2, ::2].ravel() for c in cons]), p)
    components = [_Components.of(foreground(c, mpp, t, p)) for c in cons]
    radii = np.concatenate([_inscribed_radii(c, mpp, p) for c in components])
    return Calibration(t, _typical_radius(radii, p), core), components


def split(mask: np.ndarray, mpp: float, radius_um: float, p: AdaptiveConfig,
          components: _Components | None = None, out: np.ndarray | None = None
          ) -> np.ndarray:
    """Marker-controlled split of a foreground mask.

    Markers: regional maxima of the smoothed distance transform.  Components with two or
    more markers are cut by giving each pixel to its nearest marker (Euclidean; one OpenCV
    distance transform per component box).  On the dev sets this was as accurate as a
    marker-controlled watershed of the negated smoothed distance, and ~5x cheaper.

    Parameters
    ----------
    mask : ndarray, shape (H, W), uint8 0/1
    mpp, radius_um : float
        Microns per pixel; calibrated nucleus radius (um).
    p : AdaptiveConfig
    components : _Components, optional
        Of ``mask``, if already computed.
    out : ndarray, shape (H, W), int32, optional
        Where to write the labels; may be ``components.labels`` itself (relabelled in
        place, saving a copy of the image).

    Returns
    -------
    ndarray, shape (H, W), int32
        Labels (not contiguous), 0 = background: ``out`` where given.
    """
    c = components or _Components.of(mask)
    dist, nc, comp = c.dist, c.n, c.labels
    s = p.marker_sigma_rel * radius_um / mpp
    ds = cv2.GaussianBlur(dist, (0, 0), s) if s > 0.3 else dist
    peaks = (ds >= cv2.dilate(ds, _disk(p.marker_radius_rel * radius_um / mpp))) & \
        (dist >= p.min_marker_rel * radius_um / mpp) & mask.view(bool)
    nm, markers = cv2.connectedComponents(peaks.view(np.uint8), connectivity=8,
                                          ltype=cv2.CV_32S)
    # number of markers in each component
    marker_comp = np.zeros(nm, dtype=np.int64)
    sel = c.pixels[markers.ravel()[c.pixels] > 0]  # the markers lie in the foreground
    marker_comp[markers.ravel()[sel]] = comp.ravel()[sel]
    multi = np.flatnonzero(np.bincount(marker_comp[1:], minlength=nc)[1:] >= 2) + 1
    if out is None:
        out = comp.copy()
    elif out is not comp:
        out[...] = comp
    # each pixel of a component to split goes to its nearest marker of that component
    # (Euclidean), one OpenCV distance transform per component box (~20x cheaper than one
    # over the whole image); new ids lie above the component ids
    for component, (x, y, w, h) in zip(multi, c.boxes(multi)):
        box = np.s_[y:y + h, x:x + w]
        inside = comp[box] == component
        mk = np.where(inside, markers[box], 0)
        _, nearest = cv2.distanceTransformWithLabels(
            (mk == 0).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
        at = mk > 0
        to_marker = np.zeros(int(nearest.max()) + 1, dtype=np.int32)
        to_marker[nearest[at]] = mk[at]
        out[box][inside] = one_piece_each(np.where(inside, to_marker[nearest] + nc, 0),
                                          at)[inside]
    return out


def one_piece_each(labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Make every label one 4-connected region (a single polygon outline).

    A nearest-marker split can leave a label in pieces.  The piece of a label that holds
    its seed (its marker; the first seed pixel in raster order where the seed itself is in
    pieces) stays, its other pieces (a few pixels cut off by a neighbour) become
    background.  The decision needs no piece sizes, so a tile and the whole image decide
    alike wherever they see the same seeds (giving the pieces to a neighbour instead
    scored the same on the dev sets).

    Parameters
    ----------
    labels : ndarray, shape (H, W), int32
        0 = background.
    seeds : ndarray, shape (H, W), bool
        Seed pixels, at least one inside each label.

    Returns
    -------
    ndarray, shape (H, W), int32
        The same ids, each 4-connected; a copy.

    Examples
    --------
    >>> lab = np.array([[1, 1, 2, 1],
    ...                 [1, 1, 2, 2]], np.int32)
    >>> seeds = np.array([[1, 0, 0, 0], [0, 0, 0, 1]], bool)
    >>> one_piece_each(lab, seeds)
    array([[1, 1, 2, 0],
           [1, 1, 2, 2]], dtype=int32)
    """
    out = np.array(labels, dtype=np.int32)
    pieces, n = _pieces(out)
    if n > len(np.unique(out)) - (out.min() == 0):
        flat = pieces.ravel()
        owner = np.zeros(n + 1, dtype=np.int32)
        owner[flat] = out.ravel()
        seeded = flat[np.flatnonzero(seeds.ravel() & (flat > 0))]
        _, first = np.unique(owner[seeded], return_index=True)
        stays = np.zeros(n + 1, dtype=bool)
        stays[seeded[first]] = True
        out[~stays[pieces]] = 0
    return out


def _pieces(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected regions of equal non-zero label: (H, W) int32 piece ids 1..n, and n."""
    from skimage.measure import label

    pieces, n = label(labels, background=0, connectivity=1, return_num=True)
    return pieces.astype(np.int32, copy=False), int(n)


def eosin_ratio(od: np.ndarray, eosin_od: np.ndarray, label: np.ndarray, n: int
                ) -> np.ndarray:
    """Mean eosin optical density over mean hematoxylin optical density of each label.

    Parameters
    ----------
    od, eosin_od : ndarray, shape (P,), float32
        Hematoxylin and eosin optical density (0..1) of the labelled pixels.
    label : ndarray, shape (P,), int
        Their labels, 0..n-1.
    n : int

    Returns
    -------
    ndarray, shape (n,), float64
        Eosin over hematoxylin per label (0 for labels without pixels or hematoxylin).
        Nuclei of the dev images: median 0.16-0.26; red cells 0.43.

    Examples
    --------
    >>> od = np.array([0.4, 0.2, 0.1, 0.1], np.float32)
    >>> eosin = np.array([0.1, 0.05, 0.1, 0.05], np.float32)
    >>> eosin_ratio(od, eosin, np.array([1, 1, 2, 2]), 3)
    array([0.  , 0.25, 0.75])
    """
    hematoxylin = np.bincount(label, od, minlength=n)
    eosin = np.bincount(label, eosin_od, minlength=n)
    return np.divide(eosin, hematoxylin, out=np.zeros(n), where=hematoxylin > 0)


def segment_hematoxylin_od(od: np.ndarray, mpp: float, p: AdaptiveConfig | None = None,
                           calibration: Calibration | None = None,
                           eosin_od: np.ndarray | None = None,
                           source_mpp: float | None = None
                           ) -> tuple[np.ndarray, int]:
    """Nuclei of a hematoxylin optical-density image.

    Parameters
    ----------
    od : ndarray, shape (H, W), float32
        Hematoxylin optical density, 0..1 (:func:`hematoxylin_od`).
    mpp : float
        Microns per pixel of ``od``.
    p : AdaptiveConfig, optional
        Default: the `adaptive` preset's parameters.
    calibration : Calibration, optional
        A slide's (from :func:`calibrate` on its tiles); calibrated on this image when
        omitted.
    eosin_od : ndarray, shape (H, W), float32, optional
        Eosin optical density of the same pixels (:func:`hematoxylin_od` of the eosin
        intensity) for the ``p.max_eosin_ratio`` test; without it (a grayscale image) the
        test is skipped.
    source_mpp : float, optional
        Microns per pixel of the image ``od`` was resampled from (a 20x file or slide
        segmented at 0.4 um/px): where it is coarser than ``mpp``, objects under
        ``p.min_source_px`` of its pixels are dropped.  Default: ``od`` is the source.

    Returns
    -------
    labels : ndarray, shape (H, W), int32
        Nuclei labelled 1..N, 0 = background.
    refused : ndarray, shape (K, 2), float64
        Centroids ``(x, y)`` (pixels) of the objects larger than ``p.max_area_um2`` that
        were removed.
    """
    p = p or AdaptiveConfig()
    con = contrast(od, mpp, p)
    if calibration is None:
        calibration, (components,) = _calibrated([con], mpp, p)
    else:
        components = _Components.of(foreground(con, mpp, calibration.threshold, p))
    # split in place: from here ``components.labels`` holds the split labels (its per-pixel
    # ``label`` keeps the components)
    labels = split(components.mask, mpp, calibration.radius_um, p, components,
                   out=components.labels)
    tests = dict(con=con, od=od, eosin_od=eosin_od, calibration=calibration, mpp=mpp, p=p,
                 source_mpp=source_mpp)
    # the tests and the relabelling work on the foreground pixels only (5-10% of a tile):
    # ``labels`` is non-zero exactly there
    ids, refused = _tested(labels, components, **tests)
    out = np.zeros(labels.shape, dtype=np.int32)
    out.ravel()[components.pixels] = ids
    if p.rejoin_threshold_rel > 0:
        free = rejoin_mask(con, out, mpp, calibration, p)
        rejoin = _Components.of(free)
        more = split(free, mpp, calibration.radius_um, p, rejoin, out=rejoin.labels)
        ids, refused_more = _tested(more, rejoin, first=int(ids.max(initial=0)) + 1, **tests)
        out.ravel()[rejoin.pixels] = ids
        refused = np.concatenate([refused, refused_more])
    return out, refused


def rejoin_mask(con: np.ndarray, kept: np.ndarray, mpp: float, calibration: Calibration,
                p: AdaptiveConfig) -> np.ndarray:
    """Where nuclei that the tests dropped in pieces may lie whole: the components of the
    foreground at ``p.rejoin_threshold_rel`` x the threshold, outside the kept objects
    grown by one pixel, that hold a pixel over the threshold itself.

    A pale nucleus whose chromatin clears the threshold only in specks, each under the
    area floor, is one component at the lower threshold.

    Parameters
    ----------
    con : ndarray, shape (H, W), float32
        Contrast (:func:`contrast`), top-hat optical density.
    kept : ndarray, shape (H, W), int
        The objects kept, 0 = background.
    mpp : float
        Microns per pixel.
    calibration : Calibration
    p : AdaptiveConfig

    Returns
    -------
    ndarray, shape (H, W), uint8
        0/1.

    Examples
    --------
    >>> con = np.zeros((9, 12), np.float32)
    >>> con[2:7, 1:5] = 0.1; con[3, 2] = con[5, 3] = 0.3   # pale, two specks over 0.2
    >>> con[2:7, 7:11] = 0.1                               # pale, no speck
    >>> kept = np.zeros(con.shape, np.int32)
    >>> m = rejoin_mask(con, kept, 1.0, Calibration(0.2, 2.0),
    ...                 AdaptiveConfig(rejoin_threshold_rel=0.4))
    >>> int(m[2:7, 1:5].sum()), int(m[:, 6:].sum())
    (20, 0)
    """
    grown = cv2.dilate((kept > 0).view(np.uint8), _disk(1))
    low = foreground(con, mpp, p.rejoin_threshold_rel * calibration.threshold, p)
    free = (low > grown).view(np.uint8)  # low and not grown
    n, comp = cv2.connectedComponentsWithAlgorithm(free, 4, cv2.CV_32S, cv2.CCL_GRANA)
    holds = np.bincount(comp[(con > calibration.threshold) & free.view(bool)],
                        minlength=n) > 0
    holds[0] = False
    return holds[comp].view(np.uint8)


def _tested(labels: np.ndarray, components: _Components, con: np.ndarray, od: np.ndarray,
            eosin_od: np.ndarray | None, calibration: Calibration, mpp: float,
            p: AdaptiveConfig, source_mpp: float | None, first: int = 1
            ) -> tuple[np.ndarray, np.ndarray]:
    """The objects of ``labels`` (split ``components``) that pass every test.

    Objects under max(``min_area_um2``, ``min_area_rel`` x radius^2, ``min_source_px``
    pixels of a coarser source), whose highest contrast is under ``min_peak_contrast``,
    with less than ``min_area_um2`` over the core threshold, narrower than
    ``min_width_um`` or whose eosin OD over hematoxylin OD exceeds ``max_eosin_ratio`` are
    dropped; those over ``max_area_um2`` are refused.

    Returns
    -------
    ids : ndarray, shape (P,), int32
        New id of each of ``components.pixels``: the kept objects numbered from ``first``
        in label order, 0 where dropped.
    refused : ndarray, shape (K, 2), float64
        Centroids ``(x, y)`` (pixels) of the refused objects.
    """
    pixels = components.pixels
    label = labels.ravel()[pixels]
    area = np.bincount(label, minlength=1)
    px = mpp ** 2
    coarse = source_mpp if source_mpp is not None and source_mpp > mpp else 0.0
    min_area = max(p.min_area_um2, p.min_area_rel * calibration.radius_um ** 2,
                   p.min_source_px * coarse ** 2)
    big = area > p.max_area_um2 / px
    keep = (area >= min_area / px) & ~big
    if p.min_peak_contrast > 0:
        keep &= _label_max(con.ravel()[pixels], label, len(area)) >= p.min_peak_contrast
    if calibration.core_threshold > 0:  # a field without a hematoxylin mode
        core = np.bincount(label, con.ravel()[pixels] > calibration.core_threshold,
                           minlength=len(area))
        keep &= core >= p.min_area_um2 / px
    if p.min_width_um > 0:  # membranes, fibres and slivers are thinner than any nucleus
        keep &= _label_max(components.dist.ravel()[pixels], label, len(area)) \
            >= p.min_width_um / (2 * mpp)
    if p.max_eosin_ratio > 0 and eosin_od is not None:  # red cells, eosinophilic debris
        keep &= eosin_ratio(od.ravel()[pixels], eosin_od.ravel()[pixels], label,
                            len(area)) <= p.max_eosin_ratio
    if p.mesh_area_rel > 0:  # keratin lamellae, collagen: sprawling, not a clump
        mesh = meshes(components, p.mesh_area_rel * (calibration.radius_um / mpp) ** 2,
                      p.mesh_max_solidity)
        component = np.zeros(len(area), dtype=np.int64)
        component[label] = components.label
        keep &= ~mesh[component]
    keep[0] = big[0] = False
    new = np.zeros(len(area), dtype=np.int32)
    new[keep] = np.arange(first, first + int(keep.sum()), dtype=np.int32)
    return new[label], _centroids(pixels, label, labels.shape[1], big)


def meshes(components: _Components, min_area_px: float, max_solidity: float) -> np.ndarray:
    """Which components are meshes: at least ``min_area_px`` pixels and a solidity under
    ``max_solidity`` (pixels over the area of the convex hull of their pixel centres grown
    by half its perimeter and one pixel: that of the pixel squares for an upright
    rectangle, a close estimate otherwise).

    Parameters
    ----------
    components : _Components
        Of a foreground mask.
    min_area_px, max_solidity : float
        Pixels; solidity 0..1.

    Returns
    -------
    ndarray, shape (components.n,), bool
        False for the background and for every smaller component.
    """
    mesh = np.zeros(components.n, dtype=bool)
    big = np.flatnonzero(components.area >= min_area_px)
    big = big[big > 0]
    if not len(big):
        return mesh
    width = components.labels.shape[1]
    is_big = np.zeros(components.n, dtype=bool)
    is_big[big] = True
    chosen = is_big[components.label]
    rows, cols = np.divmod(components.pixels[chosen], width)
    order = np.argsort(components.label[chosen], kind="stable")
    points = np.column_stack([cols, rows])[order].astype(np.int32)
    ends = np.cumsum(components.area[big])
    for comp, start, end in zip(big, ends - components.area[big], ends):
        hull = cv2.convexHull(points[start:end])
        # the hull of the pixel centres grown toward that of the pixel squares
        hull_area = cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1
        mesh[comp] = components.area[comp] / hull_area < max_solidity
    return mesh


def _centroids(pixels: np.ndarray, label: np.ndarray, width: int,
               which: np.ndarray) -> np.ndarray:
    """Centroids (K, 2) float64 ``(x, y)`` of the labels flagged in ``which`` (bool, one per
    label value), in label order, from the flat indices ``pixels`` (P,) of an image
    ``width`` pixels wide and their labels ``label`` (P,)."""
    if not which.any():
        return np.zeros((0, 2))
    chosen = which[label]
    rows, cols = np.divmod(pixels[chosen], width)
    _, index = np.unique(label[chosen], return_inverse=True)
    n = np.bincount(index)
    return np.column_stack([np.bincount(index, cols) / n, np.bincount(index, rows) / n])
