"""Colour normalisation and stain separation of H&E images (method section 1.1-1.2).

* Ruderman l-alpha-beta colour space (log-LMS based; the space HistomicsTK's
  ``rgb_to_lab`` uses, *not* CIE L*a*b*) and Reinhard normalisation in it.
* Optical density as HistomicsTK's "SDA": ``-log((rgb + 1) / 256) * 255 / log(256)``,
  0 (white) .. 255 (black).
* Macenko PCA stain-matrix estimation and colour deconvolution; the hematoxylin vector
  is identified by its colour, never by its position.
* :class:`StainLookup`: a fixed (statistics, stain matrix) pair applied to any RGB pixel
  by one table look-up, which is what whole slides do millions of times.

Every kernel takes arrays whose last axis holds the three channels, computes in
float32 and returns uint8 images with HistomicsTK's rounding (clip, then truncate).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import cv2
import numpy as np

from wsicell.config import StainConfig

RGB_TO_LMS = np.array(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
)
LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
LMS_TO_RGB = np.linalg.inv(RGB_TO_LMS)
LAB_TO_LMS = np.linalg.inv(LMS_TO_LAB)

_LOG256 = np.log(256.0)
_SDA_SCALE = 255.0 / _LOG256
#: ``log(v + 1)`` for every uint8 value ``v``: optical density by table look-up.
_LOG1P_U8 = np.log1p(np.arange(256, dtype=np.float64)).astype(np.float32)
#: Optical density (SDA units) of every uint8 value.
SDA_U8 = ((_LOG256 - _LOG1P_U8.astype(np.float64)) * _SDA_SCALE).astype(np.float32)


def _transform(pixels: np.ndarray, matrix: np.ndarray, offset=None) -> np.ndarray:
    """``pixels @ matrix.T + offset`` over the last axis, in float32 (OpenCV, one pass).

    Parameters
    ----------
    pixels : ndarray, shape (..., 3)
    matrix : ndarray, shape (C, 3)
    offset : ndarray, shape (C,), optional

    Returns
    -------
    ndarray, shape (..., C), float32
    """
    affine = np.zeros((matrix.shape[0], 4), dtype=np.float64)
    affine[:, :3] = matrix
    if offset is not None:
        affine[:, 3] = offset
    flat = np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1, 1, 3)
    out = cv2.transform(flat, affine)
    return out.reshape(*pixels.shape[:-1], matrix.shape[0])


def _elementwise(function, values: np.ndarray) -> np.ndarray:
    """Apply an OpenCV element-wise function (``cv2.log``, ``cv2.exp``: SIMD, float32,
    ~4x numpy's speed) to an array of any shape."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, 1)
    return function(flat).reshape(values.shape)


def _table(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``table[values]`` for a 256-entry float32 table and uint8 values of any shape
    (``cv2.LUT``, ~3x numpy's gather)."""
    values = np.ascontiguousarray(values, dtype=np.uint8)
    return cv2.LUT(values.reshape(-1, values.shape[-1]), table).reshape(values.shape)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Clip to 0..255 and truncate, as HistomicsTK does."""
    return np.clip(values, 0, 255, out=values).astype(np.uint8)


def _log_lms(rgb: np.ndarray) -> np.ndarray:
    """Natural log of LMS cone responses, shape (..., 3) float32 (0 -> log(eps))."""
    lms = _transform(rgb, RGB_TO_LMS)
    # LMS is 0 only for black (the matrix is positive); HistomicsTK puts eps there.  In
    # float32 (OpenCV): numpy's maximum with a float64 eps computes in float64, 20x slower.
    flat = lms.reshape(-1, 1)
    cv2.max(flat, float(np.finfo(np.float64).eps), dst=flat)
    return _elementwise(cv2.log, lms)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Ruderman l-alpha-beta of RGB values.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3)
        RGB, 0..255 (any numeric dtype).

    Returns
    -------
    ndarray, shape (..., 3), float32
    """
    return _transform(_log_lms(rgb), LMS_TO_LAB)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab`; float32 RGB, not clipped."""
    lms = _elementwise(cv2.exp, _transform(lab, LAB_TO_LMS))
    return _transform(lms, LMS_TO_RGB)


@dataclass(frozen=True)
class LabStats:
    """Per-channel mean and standard deviation in l-alpha-beta, each shape (3,) float64."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def target(cls, config: StainConfig) -> "LabStats":
        return cls(tuple(config.target_lab_mean), tuple(config.target_lab_std))


def _pixels(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The (N, 3) pixels of an image or pixel array, restricted to a mask."""
    pixels = np.asarray(rgb).reshape(-1, 3)
    if mask is not None:
        pixels = pixels[np.asarray(mask, dtype=bool).reshape(-1)]
    if len(pixels) == 0:
        raise ValueError("no pixels to estimate from (empty image or empty mask)")
    return pixels


def _moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation of the columns of (N, 3) values, float64."""
    mean, std = cv2.meanStdDev(np.ascontiguousarray(values, dtype=np.float32).reshape(-1, 1, 3))
    return mean.ravel(), std.ravel()


def lab_mean_std(rgb: np.ndarray, mask: np.ndarray | None = None) -> LabStats:
    """Reinhard statistics of an image (or of an (N, 3) pixel sample).

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3) or (N, 3), uint8
    mask : ndarray of bool, optional
        Pixels to use (same leading shape as ``rgb``); all when omitted.
    """
    mean, std = _moments(rgb_to_lab(_pixels(rgb, mask)))
    return LabStats(tuple(mean), tuple(std))


def _reinhard_log_lms_map(source: LabStats, target: LabStats) -> tuple[np.ndarray, np.ndarray]:
    """Affine map on log-LMS equivalent to standardising l-alpha-beta with ``source`` and
    re-scaling with ``target``: returns ``(matrix (3,3), offset (3,))``."""
    scale = np.asarray(target.std) / np.asarray(source.std)
    shift = np.asarray(target.mean) - np.asarray(source.mean) * scale
    return LAB_TO_LMS @ np.diag(scale) @ LMS_TO_LAB, LAB_TO_LMS @ shift


def reinhard(rgb: np.ndarray, source: LabStats, target: LabStats) -> np.ndarray:
    """Reinhard colour normalisation: match l-alpha-beta mean and std to a target.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3), uint8
    source : LabStats
        Statistics of the input (from :func:`lab_mean_std`).
    target : LabStats
        Statistics to reach (:meth:`LabStats.target` gives the paper's standard).

    Returns
    -------
    ndarray, shape (..., 3), uint8
    """
    matrix, offset = _reinhard_log_lms_map(source, target)
    lms = _elementwise(cv2.exp, _transform(_log_lms(rgb), matrix, offset))
    return _to_uint8(_transform(lms, LMS_TO_RGB))


def rgb_to_sda(rgb: np.ndarray) -> np.ndarray:
    """Optical density in SDA units (0 = white, 255 = black) of uint8 RGB, float32."""
    return _table(SDA_U8, rgb)


def _unit_columns(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=0, keepdims=True)


def complement_stain_matrix(stains: np.ndarray) -> np.ndarray:
    """Complete two unit stain vectors (columns of (3, 2)) to a 3x3 matrix with their
    normalised cross product as third column."""
    third = np.cross(stains[:, 0], stains[:, 1])
    return np.column_stack([stains[:, 0], stains[:, 1], third / np.linalg.norm(third)])


def _percentile_index(values: np.ndarray, fraction: float) -> int:
    """Index of the element at a percentile, as HistomicsTK's ``argpercentile``."""
    i = min(int(fraction * values.size + 0.5), values.size - 1)
    return int(np.argpartition(values, i)[i])


def macenko_stain_vectors(
    sda: np.ndarray, min_magnitude: float = 16.0, percentiles: tuple[float, float] = (0.01, 0.99)
) -> np.ndarray:
    """Two stain vectors by Macenko's PCA method.

    The optical densities are projected on the plane of their two main (uncentred)
    principal directions; pixels whose projection is shorter than ``min_magnitude`` are
    dropped; the pixels at the lower and upper percentile of the angle distribution give
    the two stain vectors.

    Parameters
    ----------
    sda : ndarray, shape (N, 3), float
        Optical densities (SDA units) of the pixels.
    min_magnitude : float
        Smallest projected magnitude kept (SDA units).
    percentiles : (float, float)
        Angle percentiles as fractions.

    Returns
    -------
    ndarray, shape (3, 2), float64
        Unit stain vectors as columns (order: lower, upper angle percentile).
    """
    sda = np.ascontiguousarray(sda, dtype=np.float32).reshape(-1, 3)
    gram = (sda.T @ sda).astype(np.float64)
    if not np.isfinite(gram).all():
        raise ValueError("optical densities must be finite")
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    plane = eigenvectors[:, np.argsort(eigenvalues)[::-1][:2]]
    # Fix the arbitrary signs: first direction along the mean density.
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0
    x, y = (_transform(sda, direction[None, :])[:, 0] for direction in plane.T)
    magnitude = cv2.magnitude(x, y).ravel()
    kept = np.flatnonzero(magnitude > min_magnitude)
    if len(kept) < 2:
        raise ValueError("too few stained pixels for Macenko stain estimation")
    angles = (1 - y[kept] / magnitude[kept]) * np.sign(x[kept])
    picks = kept[[_percentile_index(angles, p) for p in percentiles]]
    return _unit_columns(plane @ np.array([x[picks], y[picks]], dtype=np.float64))


def hematoxylin_first(stains: np.ndarray, hematoxylin_reference) -> np.ndarray:
    """Order two stain vectors as [hematoxylin, eosin] by colour and complete to 3x3.

    Parameters
    ----------
    stains : ndarray, shape (3, 2)
        Unit stain vectors in any order.
    hematoxylin_reference : sequence of 3 floats
        Reference optical-density colour of hematoxylin.

    Returns
    -------
    ndarray, shape (3, 3), float64
        Columns [hematoxylin, eosin, residual].
    """
    reference = np.asarray(hematoxylin_reference, dtype=np.float64)
    similarity = np.abs(reference @ stains) / np.linalg.norm(reference)
    order = np.argsort(-similarity)
    return complement_stain_matrix(stains[:, order])


def plausible_hematoxylin(stain_matrix: np.ndarray, hematoxylin_reference,
                          max_angle: float) -> np.ndarray:
    """A stain matrix whose hematoxylin vector lies at most ``max_angle`` degrees from the
    reference; one further off (fitted on fat, blood or mucus, where the first stain
    vector is no hematoxylin) has it replaced by the reference, the eosin vector kept.

    Parameters
    ----------
    stain_matrix : ndarray, shape (3, 3)
        Columns [hematoxylin, eosin, residual] (:func:`hematoxylin_first`).
    hematoxylin_reference : sequence of 3 floats
        Reference optical-density colour of hematoxylin.
    max_angle : float
        Degrees.

    Returns
    -------
    ndarray, shape (3, 3), float64
        ``stain_matrix`` itself, or [reference, eosin, their cross product], unit columns.

    Examples
    --------
    >>> reference = np.array([0.65, 0.70, 0.29])
    >>> grey = complement_stain_matrix(np.array([[0.58, 0.58, 0.58], [0.1, 0.9, 0.4]]).T)
    >>> fixed = plausible_hematoxylin(grey, reference, 15.0)
    >>> bool(np.allclose(fixed[:, 0], reference / np.linalg.norm(reference)))
    True
    >>> plausible_hematoxylin(grey, reference, 30.0) is grey
    True
    """
    reference = np.asarray(hematoxylin_reference, dtype=np.float64)
    reference = reference / np.linalg.norm(reference)
    hematoxylin = stain_matrix[:, 0] / np.linalg.norm(stain_matrix[:, 0])
    if np.degrees(np.arccos(min(abs(float(reference @ hematoxylin)), 1.0))) <= max_angle:
        return stain_matrix
    return complement_stain_matrix(np.column_stack([reference, stain_matrix[:, 1]]))


def color_deconvolution(rgb: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Stain intensity images of a uint8 RGB image.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3), uint8
    stain_matrix : ndarray, shape (3, 3)
        Stain vectors as columns.

    Returns
    -------
    ndarray, shape (..., 3), uint8
        One intensity image per stain column (0 = much stain, 255 = none).
    """
    inverse = np.linalg.pinv(_unit_columns(np.asarray(stain_matrix, dtype=np.float64)))
    return _stain_intensity(rgb, inverse)


def _stain_intensity(rgb: np.ndarray, inverse_rows: np.ndarray) -> np.ndarray:
    """Intensities of the stains given by rows of the inverse stain matrix (C, 3).

    Intensity = ``256 ** (1 - density / 255) - 1`` with density = rows . SDA(rgb);
    computed in log space from a per-value table of ``log(v + 1)``.
    """
    rows = np.asarray(inverse_rows, dtype=np.float64)
    # density/255*log256 = log256*sum(q) - q.log1p(rgb)  =>  intensity = exp(log256 - that) - 1
    log_intensity = _transform(_table(_LOG1P_U8, rgb), rows, _LOG256 * (1.0 - rows.sum(axis=1)))
    return _to_uint8(_elementwise(cv2.exp, log_intensity) - 1.0)


def stain_intensity(rgb: np.ndarray, stain_matrix: np.ndarray, stain: int = 0) -> np.ndarray:
    """One stain's channel (0..255, dark = much stain) of a uint8 RGB image.

    ``stain_matrix`` has hematoxylin as its first column and eosin as its second (see
    :func:`hematoxylin_first`); ``stain`` is the column (0: hematoxylin, 1: eosin).
    Returns an array of the image's leading shape, uint8.
    """
    inverse = np.linalg.pinv(_unit_columns(np.asarray(stain_matrix, dtype=np.float64)))
    return _stain_intensity(rgb, inverse[stain:stain + 1])[..., 0]


@dataclass(frozen=True)
class StainParameters:
    """A fixed colour standardisation: Reinhard statistics and a stain matrix.

    ``stain_matrix`` (3x3, columns [hematoxylin, eosin, residual]) was estimated on the
    *normalised* pixels, and is applied to the normalised image.
    """

    source: LabStats
    target: LabStats
    stain_matrix: tuple[tuple[float, float, float], ...]

    def to_json(self) -> dict:
        return {
            "source_lab_mean": list(self.source.mean),
            "source_lab_std": list(self.source.std),
            "target_lab_mean": list(self.target.mean),
            "target_lab_std": list(self.target.std),
            "stain_matrix": [list(row) for row in self.stain_matrix],
        }

    @classmethod
    def from_json(cls, data: dict) -> "StainParameters":
        return cls(
            LabStats(tuple(data["source_lab_mean"]), tuple(data["source_lab_std"])),
            LabStats(tuple(data["target_lab_mean"]), tuple(data["target_lab_std"])),
            tuple(tuple(float(v) for v in row) for row in data["stain_matrix"]),
        )

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        """Reinhard-normalised uint8 image of the same shape."""
        return reinhard(rgb, self.source, self.target)

    def hematoxylin(self, normalised: np.ndarray) -> np.ndarray:
        """Hematoxylin channel (uint8, leading shape) of a normalised image."""
        return stain_intensity(normalised, np.asarray(self.stain_matrix))

    def eosin(self, normalised: np.ndarray) -> np.ndarray:
        """Eosin channel (uint8, leading shape) of a normalised image."""
        return stain_intensity(normalised, np.asarray(self.stain_matrix), stain=1)

    def hematoxylin_of(self, rgb: np.ndarray) -> np.ndarray:
        """Hematoxylin channel (uint8, leading shape) of a raw image, after normalising it
        (the same as :meth:`StainLookup.hematoxylin_of`, cheaper below a few tens of
        megapixels)."""
        return self.hematoxylin(self.normalise(rgb))

    def stains_of(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hematoxylin and eosin channels (uint8, leading shape each) of a raw image, after
        normalising it once (the same as :meth:`StainLookup.stains_of`)."""
        normalised = self.normalise(rgb)
        return self.hematoxylin(normalised), self.eosin(normalised)


def fit_stain_parameters(
    rgb: np.ndarray, config: StainConfig = StainConfig(), mask: np.ndarray | None = None,
    max_gain: float | None = None, max_hematoxylin_angle: float | None = None,
) -> StainParameters:
    """Estimate a slide's or image's colour standardisation.

    Reinhard statistics of the raw pixels, then the Macenko stain matrix of the
    *normalised* pixels (deconvolution is applied to the normalised image too).  At most
    ``config.fit_max_pixels`` evenly strided pixels are used.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3) or (N, 3), uint8
        Image or pixel sample.
    config : StainConfig
    mask : ndarray of bool, optional
        Pixels to estimate from (e.g. tissue).
    max_gain : float, optional
        Largest contrast gain of the normalisation (target over source standard deviation,
        per Lab channel): the source deviations are floored at ``target / max_gain``.  A
        field without nuclei (fat, glass, blood) has a tiny colour spread, and matching it to
        the target's would stretch its noise into stain; None: no limit.
    max_hematoxylin_angle : float, optional
        Degrees: a fitted hematoxylin vector further than this from
        ``config.hematoxylin_reference`` is replaced by it (:func:`plausible_hematoxylin`);
        None: no limit.
    """
    pixels = _pixels(rgb, mask)
    if config.fit_max_pixels and len(pixels) > config.fit_max_pixels:
        pixels = pixels[:: -(-len(pixels) // config.fit_max_pixels)]
    source = lab_mean_std(pixels)
    if min(source.std) <= 1e-6:
        raise ValueError("no colour variation to estimate stains from (blank image)")
    target = LabStats.target(config)
    if max_gain:
        source = LabStats(source.mean, tuple(np.maximum(source.std,
                                                        np.array(target.std) / max_gain)))
    stains = macenko_stain_vectors(
        rgb_to_sda(reinhard(pixels, source, target)),
        config.macenko_min_magnitude,
        config.macenko_angle_percentiles,
    )
    matrix = hematoxylin_first(stains, config.hematoxylin_reference)
    if max_hematoxylin_angle:
        matrix = plausible_hematoxylin(matrix, config.hematoxylin_reference,
                                       max_hematoxylin_angle)
    return StainParameters(source, target, tuple(tuple(float(v) for v in row) for row in matrix))


class StainLookup:
    """A :class:`StainParameters` tabulated for all 2^24 RGB colours.

    ``colour_table[(r << 16) | (g << 8) | b]`` holds the normalised colour as a 4-byte word
    (64 MiB) and ``stain_table`` its hematoxylin and eosin intensities as a 2-byte word
    (32 MiB).  Building costs about a second; applying it is one gather per pixel,
    independent of the colour maths.  Segmentation needs only the stains of every pixel,
    the small table (both stains in one gather: a pixel's cost is the random access);
    crops need the colour of a third as many pixels.
    """

    N_COLOURS = 1 << 24
    N_BLOCKS = 16  #: parts of the tables that can be built apart (e.g. by different workers)
    BLOCK = N_COLOURS // N_BLOCKS
    _STEP = 1 << 17  # colours per step of a build: its float32 temporaries fit L2

    def __init__(self, colour_table: np.ndarray, stain_table: np.ndarray):
        if colour_table.shape != (self.N_COLOURS, 4) or colour_table.dtype != np.uint8:
            raise ValueError("a colour lookup table has shape (2**24, 4) and dtype uint8")
        if stain_table.shape != (self.N_COLOURS, 2) or stain_table.dtype != np.uint8:
            raise ValueError("a stain lookup table has shape (2**24, 2) and dtype uint8")
        self.colour_table = colour_table
        self.stain_table = stain_table

    @classmethod
    def build(cls, params: StainParameters) -> "StainLookup":
        """The tables of ``params``, every block computed here."""
        return cls.from_blocks((index, *cls.build_block(params, index))
                               for index in range(cls.N_BLOCKS))

    @classmethod
    def from_blocks(cls, blocks) -> "StainLookup":
        """Tables from ``(index, colours, stains)`` triples (see :meth:`build_block`), one
        per block index, in any order."""
        colours = np.empty((cls.N_COLOURS, 4), dtype=np.uint8)
        stains = np.empty((cls.N_COLOURS, 2), dtype=np.uint8)
        filled = set()
        for index, block_colours, block_stains in blocks:
            rows = slice(index * cls.BLOCK, (index + 1) * cls.BLOCK)
            colours[rows], stains[rows] = block_colours, block_stains
            filled.add(index)
        missing = set(range(cls.N_BLOCKS)) - filled
        if missing:
            raise ValueError(f"lookup blocks missing: {sorted(missing)}")
        return cls(colours, stains)

    @classmethod
    def build_block(cls, params: StainParameters, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``index * BLOCK`` to ``(index + 1) * BLOCK`` of the tables: the normalised
        colours as 4-byte words, (BLOCK, 4) uint8 (the fourth byte 0), and their hematoxylin
        and eosin intensities, (BLOCK, 2) uint8."""
        codes = np.arange(cls._STEP, dtype=np.uint32)
        first_step = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1)
        first_step = first_step.astype(np.uint8)  # the other steps differ in red only
        colours = np.empty((cls.BLOCK, 4), dtype=np.uint8)
        stains = np.empty((cls.BLOCK, 2), dtype=np.uint8)
        for offset in range(0, cls.BLOCK, cls._STEP):
            rgb = first_step.copy()
            rgb[:, 0] += (index * cls.BLOCK + offset) >> 16
            normalised = params.normalise(rgb)
            # whole 4-byte rows: writing 3 of every 4 bytes cost a quarter of the build
            colours[offset:offset + cls._STEP] = cv2.cvtColor(
                normalised[:, None], cv2.COLOR_RGB2RGBA)[:, 0]
            stains[offset:offset + cls._STEP] = np.column_stack(
                [params.hematoxylin(normalised), params.eosin(normalised)])
        colours[:, 3] = 0
        return colours, stains

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        """Normalised colours of uint8 RGB pixels, shape (..., 3) -> (..., 3)."""
        codes = colour_codes(rgb)
        # One 4-byte word per colour: a flat gather is ~8x faster than row indexing.
        words = np.take(self.colour_table.view(np.uint32).ravel(), codes)
        normalised = cv2.cvtColor(words.view(np.uint8).reshape(*codes.shape, 4),
                                  cv2.COLOR_RGBA2RGB)
        return normalised.reshape(np.shape(rgb))

    def hematoxylin_of(self, rgb: np.ndarray) -> np.ndarray:
        """Hematoxylin intensity of the normalised colours of uint8 RGB pixels, shape
        (..., 3) -> (...) uint8."""
        return cv2.extractChannel(self._stain_words(rgb), 0).reshape(np.shape(rgb)[:-1])

    def stains_of(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hematoxylin and eosin intensities of the normalised colours of uint8 RGB pixels,
        shape (..., 3) -> two (...) uint8 (one gather; the colours are not needed)."""
        shape = np.shape(rgb)[:-1]
        return tuple(c.reshape(shape) for c in cv2.split(self._stain_words(rgb)))

    def _stain_words(self, rgb: np.ndarray) -> np.ndarray:
        """The stain table's rows of uint8 RGB pixels (..., 3), gathered as 2-byte words:
        (rows, columns, 2) uint8 (the shape of :func:`colour_codes`)."""
        codes = colour_codes(rgb)
        words = np.take(self.stain_table.view(np.uint16).ravel(), codes)
        return words.view(np.uint8).reshape(*codes.shape, 2)


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """24-bit colour codes ``(r << 16) | (g << 8) | b`` of uint8 RGB pixels.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3), uint8

    Returns
    -------
    ndarray, shape (rows, columns), uint32
        The pixels as a 2-D image (an (H, W, 3) image keeps its shape; other shapes are
        folded to rows of their second-to-last axis).
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    image = rgb.reshape(-1, rgb.shape[-2] if rgb.ndim > 2 else 1, 3)
    red, green, blue = cv2.split(image)
    zero = np.zeros_like(red)
    # The bytes of each pixel's 4-byte word, so that the word is (r << 16) | (g << 8) | b
    little = sys.byteorder == "little"
    codes = cv2.merge([blue, green, red, zero] if little else [zero, red, green, blue])
    return codes.view(np.uint32).reshape(image.shape[:2])
