"""Reading images: plain RGB images and whole-slide pyramids, resampled to a reference grid.

A :class:`Slide` hides which library reads the file: OpenSlide for the pyramidal formats it
knows (.svs, .ndpi, .mrxs, .scn, tiled TIFF, ...), large_image for what OpenSlide cannot
open, and Pillow for plain images (one-level slides).  Every reader answers the same
questions: level-0 size, microns per pixel, pyramid levels, a region of a level, a thumbnail.

:func:`read_reference_region` then gives any window of the slide on the *reference grid*,
the slide resampled to the segmentation's resolution (``reference_mpp``).  The value of a
reference pixel depends only on its position, never on the window it is read in, so tiles
read separately fit together exactly like a read of the whole slide.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import sys
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from wsicell.config import MPP_RANGE
from wsicell.errors import WsicellError
from wsicell.files import existing_file

#: Largest plain image (PNG, JPEG, plain TIFF) read whole into memory, in pixels: 2^31 px
#: is 6 GiB of RGB.  Pillow's own, smaller, decompression-bomb limit does not apply.
MAX_PLAIN_IMAGE_PIXELS = 1 << 31
_PILLOW_LIMIT = threading.Lock()

PLAIN_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
SLIDE_SUFFIXES = PLAIN_IMAGE_SUFFIXES | frozenset(
    {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".qptiff", ".ome.tif"}
)
_MPP_RANGE = MPP_RANGE  # plausible microscope resolutions, um/px


@contextmanager
def open_plain_image(path: Path, max_pixels: int = MAX_PLAIN_IMAGE_PIXELS):
    """Open a plain image file with Pillow (header only), refusing one larger than
    ``max_pixels`` before any pixel is decoded.

    Pillow's process-wide decompression-bomb limit is lifted only while the header is read
    (under a lock), and restored, so importing or calling wsicell leaves it unchanged.

    Raises
    ------
    WsicellError
        ``<path>: image of W x H pixels exceeds the limit of N pixels``.
    """
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise WsicellError(f"{path}: image of {width} x {height} pixels exceeds the limit "
                               f"of {max_pixels} pixels for plain images")
        yield image


def read_rgb_image(path: str | Path, max_pixels: int = MAX_PLAIN_IMAGE_PIXELS) -> np.ndarray:
    """Read a plain image file (PNG, JPEG, TIFF, ...) as RGB.

    Grayscale images are replicated to three channels; an alpha channel is composited
    over white (transparent = background), as slide scanners do.

    Parameters
    ----------
    path : str or Path
        Image file.
    max_pixels : int
        Refuse a larger image (before decoding it).

    Returns
    -------
    ndarray, shape (H, W, 3), uint8

    Raises
    ------
    WsicellError
        When the file is missing, is not an image, or is truncated / corrupt.
    """
    path = existing_file(path)
    try:
        with open_plain_image(path, max_pixels) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise WsicellError(f"{path}: not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise WsicellError(f"{path}: unreadable or truncated image ({err})") from None
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise WsicellError(f"{path}: image is empty")
    return np.ascontiguousarray(rgb)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite a non-premultiplied RGBA image over white.

    Parameters
    ----------
    rgba : ndarray, shape (H, W, 4), uint8

    Returns
    -------
    ndarray, shape (H, W, 3), uint8
    """
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def premultiplied_argb_to_rgb(argb: np.ndarray) -> np.ndarray:
    """Composite premultiplied ARGB words (OpenSlide's pixel format) over white.

    Parameters
    ----------
    argb : ndarray, shape (H, W), uint32
        ``0xAARRGGBB`` with colour premultiplied by alpha.

    Returns
    -------
    ndarray, shape (H, W, 3), uint8
        ``colour + (255 - alpha)``: exact for premultiplied colour over white.
    """
    channels = argb.view(np.uint8).reshape(*argb.shape, 4)
    if sys.byteorder == "little":  # bytes B, G, R, A
        rgb, alpha = cv2.cvtColor(channels, cv2.COLOR_BGRA2RGB), channels[..., 3]
    else:  # bytes A, R, G, B
        rgb, alpha = np.ascontiguousarray(channels[..., 1:]), channels[..., 0]
    transparent = 255 - alpha
    if transparent.any():
        rgb += transparent[..., None]
    return rgb


def _plausible_mpp(value) -> float | None:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1] else None


def _mean_mpp(mpp_x, mpp_y) -> float | None:
    values = [v for v in (_plausible_mpp(mpp_x), _plausible_mpp(mpp_y)) if v is not None]
    return float(np.mean(values)) if values else None


class Slide:
    """An opened slide: level-0 size, resolution, pyramid levels and region reads.

    Attributes
    ----------
    path : Path
    backend : str
        ``"openslide"``, ``"large_image"`` or ``"image"``.
    width, height : int
        Level-0 size in pixels.
    mpp : float or None
        Level-0 microns per pixel from the file's metadata (None when it has none).
    level_dimensions : list of (int, int)
        (width, height) of each level, level 0 first.
    level_downsamples : list of float
        Level-0 pixels per pixel of each level.
    """

    backend = ""

    def __init__(self, path: Path, level_dimensions, level_downsamples, mpp: float | None):
        self.path = path
        self.level_dimensions = [tuple(int(v) for v in d) for d in level_dimensions]
        self.level_downsamples = [float(d) for d in level_downsamples]
        self.width, self.height = self.level_dimensions[0]
        self.mpp = mpp

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_level_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """A window of one pyramid level; pixels outside the level are white.

        Parameters
        ----------
        level : int
        x, y : int
            Top-left corner in pixels *of that level* (may be negative).
        width, height : int
            Size in pixels of that level.

        Returns
        -------
        ndarray, shape (height, width, 3), uint8
        """
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        if x1 > x0 and y1 > y0:
            try:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read(level, x0, y0, x1 - x0, y1 - y0)
            except WsicellError:
                raise
            except Exception as err:  # any decoder failure is a property of the file
                raise WsicellError(
                    f"{self.path}: unreadable region (level {level}, x {x0}, y {y0}, "
                    f"{x1 - x0}x{y1 - y0} px): {type(err).__name__}: {err}"
                ) from None
        return out

    def thumbnail(self, width: int, height: int) -> np.ndarray:
        """The whole slide at (about) ``width`` x ``height`` pixels, RGB uint8."""
        try:
            return self._thumbnail(max(1, width), max(1, height))
        except WsicellError:
            raise
        except Exception as err:
            raise WsicellError(
                f"{self.path}: unreadable thumbnail: {type(err).__name__}: {err}"
            ) from None

    def close(self) -> None:
        """Release the file."""

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def _thumbnail(self, width: int, height: int) -> np.ndarray:
        raise NotImplementedError


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide."""

    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as err:
            raise WsicellError(f"{path}: unreadable slide ({err})") from None
        props = self._osr.properties
        mpp = _mean_mpp(props.get("openslide.mpp-x"), props.get("openslide.mpp-y"))
        super().__init__(path, self._osr.level_dimensions, self._osr.level_downsamples, mpp)
        self._tiled_levels: dict[int, TiledPageReader] = {}
        if props.get("openslide.vendor") in PLAIN_TIFF_VENDORS:
            self._tiled_levels = self._verified_tiled_levels()

    def _verified_tiled_levels(self) -> dict[int, "TiledPageReader"]:
        """Readers of the levels stored as plain tiled TIFF pages, each checked to decode
        its first tile exactly as OpenSlide does (any doubt: OpenSlide reads that level)."""
        import tifffile

        try:
            tif = tifffile.TiffFile(self.path)
        except Exception:  # OpenSlide reads it; tifffile's opinion is only an optimisation
            return {}
        readers = {}
        with tif:  # a reader keeps what it needs of its page, and its own file descriptor
            for level, size in enumerate(self.level_dimensions):
                page = next((p for p in tif.pages if TiledPageReader.supports(p)
                             and (p.imagewidth, p.imagelength) == size), None)
                reader = page and TiledPageReader(self.path, page)
                if reader and self._reads_like_openslide(reader, level):
                    readers[level] = reader
                elif reader:
                    reader.close()
        return readers

    def _reads_like_openslide(self, reader: "TiledPageReader", level: int) -> bool:
        """Whether ``reader`` decodes the first tile of ``level`` exactly as OpenSlide does."""
        width, height = self.level_dimensions[level]
        side_x, side_y = min(reader.tile_width, width), min(reader.tile_height, height)
        try:
            return np.array_equal(reader.read(0, 0, side_x, side_y),
                                  self._openslide_read(level, 0, 0, side_x, side_y))
        except Exception:  # a tile tifffile cannot decode: OpenSlide reads that level
            return False

    def _read(self, level, x, y, width, height):
        if level in self._tiled_levels:
            return self._tiled_levels[level].read(x, y, width, height)
        return self._openslide_read(level, x, y, width, height)

    def _openslide_read(self, level, x, y, width, height):
        from openslide import lowlevel

        downsample = self.level_downsamples[level]
        # OpenSlide's C reader straight into a numpy buffer: premultiplied ARGB words,
        # saving the two image copies of the PIL route (a third of the read time)
        argb = np.empty((height, width), dtype=np.uint32)
        lowlevel._read_region(
            self._osr._osr, argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
            round(x * downsample), round(y * downsample), level, width, height,
        )
        return premultiplied_argb_to_rgb(argb)

    def _thumbnail(self, width, height):
        return np.asarray(self._osr.get_thumbnail((width, height)).convert("RGB"))

    def close(self):
        for reader in self._tiled_levels.values():
            reader.close()
        self._osr.close()


PLAIN_TIFF_VENDORS = frozenset({"aperio", "generic-tiff"})  # levels are plain tiled pages


class DecodedTiles:
    """The most recently decoded tiles of every :class:`TiledPageReader` in this process,
    at most ``capacity`` bytes of them (least recently used go first); thread-safe.

    A tile's window with its halo starts and ends inside JPEG tiles that the neighbouring
    windows decode too: on the benchmark slide (512 px tiles, 2048 px windows + 64 px halo)
    a window decodes twice the pixels it keeps, and 128 MiB kept about 28% of the decodes
    of an ingest with two workers.
    """

    def __init__(self, capacity: int):
        self.capacity, self.size = capacity, 0
        self._tiles: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key, tile: np.ndarray) -> None:
        with self._lock:
            if key in self._tiles or tile.nbytes > self.capacity:
                return
            self._tiles[key] = tile
            self.size += tile.nbytes
            while self.size > self.capacity:
                self.size -= self._tiles.popitem(last=False)[1].nbytes


#: Decoded tiles kept per process (shared by the slides a worker has open)
DECODED_TILES = DecodedTiles(128 << 20)
_READER_IDS = itertools.count()


class TiledPageReader:
    """Regions of one tiled TIFF page, its tiles decoded straight from the file.

    OpenSlide decodes a JPEG tile to premultiplied ARGB and paints it through cairo; here
    tifffile's codec (libjpeg-turbo) decodes it to RGB directly, about 4x faster on the
    benchmark slide, with the same pixels.  Reads use ``os.pread``, so threads may share
    one reader.

    Parameters
    ----------
    path : Path
        The TIFF file.
    page : tifffile.TiffPage
        A page for which :meth:`supports` holds.
    """

    def __init__(self, path: Path, page):
        self.tile_width, self.tile_height = page.tilewidth, page.tilelength
        self._tiles_across = -(-page.imagewidth // self.tile_width)
        self._offsets, self._byte_counts = page.dataoffsets, page.databytecounts
        self._decode = page.decode
        self._jpeg_tables = page.jpegtables
        self._fd = os.open(path, os.O_RDONLY)
        self._id = next(_READER_IDS)  # keys this reader's tiles in DECODED_TILES

    @staticmethod
    def supports(page) -> bool:
        """Tiled, one plane of interleaved 8-bit RGB, with a codec tifffile has."""
        try:
            page.decode  # raises when the compression has no codec here
        except Exception:
            return False
        return (page.is_tiled and page.samplesperpixel == 3 and page.dtype == np.uint8
                and page.planarconfig == 1 and page.tiledepth == 1)

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The window ``[x, x + width) x [y, y + height)`` inside the page, (height, width, 3)
        uint8; missing (empty) tiles are white."""
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        tw, th = self.tile_width, self.tile_height
        for row in range(y // th, (y + height - 1) // th + 1):
            for col in range(x // tw, (x + width - 1) // tw + 1):
                index = row * self._tiles_across + col
                if not self._byte_counts[index]:
                    continue
                tile = self._tile(index)
                tx, ty = col * tw, row * th
                x0, y0 = max(x, tx), max(y, ty)
                x1, y1 = min(x + width, tx + tw), min(y + height, ty + th)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
        return out

    def _tile(self, index: int) -> np.ndarray:
        """Tile ``index`` decoded, (tile_height, tile_width, 3) uint8 (read only)."""
        key = (self._id, index)
        tile = DECODED_TILES.get(key)
        if tile is None:
            data = os.pread(self._fd, self._byte_counts[index], self._offsets[index])
            tile = self._decode(data, index, jpegtables=self._jpeg_tables)[0][0]
            tile.flags.writeable = False
            DECODED_TILES.put(key, tile)
        return tile

    def close(self) -> None:
        os.close(self._fd)


def tiff_damage(path: Path) -> str | None:
    """Why a TIFF-based file (.tif, .svs, ...) is truncated or corrupt, or None.

    Every page (IFD) must lie inside the file and every tile or strip of every page must end
    before the end of the file; a file that is not a TIFF at all is not judged here (None).
    """
    import logging

    import tifffile

    size = Path(path).stat().st_size
    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            problems.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
                if ends and max(ends) > size:
                    return f"image data ends at byte {max(ends)} of a {size}-byte file"
    except tifffile.TiffFileError:
        return None
    except Exception as err:  # noqa: BLE001 - a TIFF whose structure cannot be walked
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    finally:
        logger.removeHandler(handler)
    offsets = [p for p in problems if "offset" in p]
    return offsets[0].strip("<>").split("> ")[-1] if offsets else None


class LargeImageSlide(Slide):
    """A slide read by large_image (formats OpenSlide cannot open); level 0 only."""

    backend = "large_image"

    def __init__(self, path: Path):
        import large_image

        damage = tiff_damage(path)
        if damage:
            raise WsicellError(f"{path}: not a readable slide: truncated or corrupt file "
                               f"({damage}); OpenSlide cannot read it and another reader would "
                               "give a partial picture")
        try:
            self._source = large_image.open(str(path))
            meta = self._source.getMetadata()
        except Exception as err:
            raise WsicellError(
                f"{path}: not a readable slide or image (no reader recognises it: truncated, "
                f"corrupt or not a slide file; {err})"
            ) from None
        mm_x, mm_y = meta.get("mm_x"), meta.get("mm_y")
        mpp = _mean_mpp(mm_x and mm_x * 1000, mm_y and mm_y * 1000)
        super().__init__(path, [(meta["sizeX"], meta["sizeY"])], [1.0], mpp)

    def _as_rgb(self, array: np.ndarray) -> np.ndarray:
        if array.ndim == 2:
            array = array[..., None]
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        if array.shape[2] == 4:
            return composite_on_white(array.astype(np.uint8))
        return np.ascontiguousarray(array[..., :3].astype(np.uint8))

    def _read(self, level, x, y, width, height):
        import large_image

        array, _ = self._source.getRegion(
            region=dict(left=x, top=y, width=width, height=height, units="base_pixels"),
            format=large_image.constants.TILE_FORMAT_NUMPY,
        )
        return self._as_rgb(array)

    def _thumbnail(self, width, height):
        import large_image

        array, _ = self._source.getThumbnail(
            width=width, height=height, format=large_image.constants.TILE_FORMAT_NUMPY
        )
        return self._as_rgb(array)


class ImageSlide(Slide):
    """A plain image (PNG, JPEG, non-pyramidal TIFF) held in memory as a one-level slide."""

    backend = "image"

    def __init__(self, path: Path, max_pixels: int = MAX_PLAIN_IMAGE_PIXELS):
        self._rgb = read_rgb_image(path, max_pixels)
        with open_plain_image(path) as im:
            dpi = im.info.get("dpi")
        mpp = _mean_mpp(*(25400.0 / float(d) if d else None for d in dpi)) if dpi else None
        super().__init__(path, [self._rgb.shape[1::-1]], [1.0], mpp)

    def _read(self, level, x, y, width, height):
        return self._rgb[y:y + height, x:x + width]

    def _thumbnail(self, width, height):
        return cv2.resize(self._rgb, (width, height), interpolation=cv2.INTER_AREA)


def open_slide(path: str | Path, max_plain_pixels: int = MAX_PLAIN_IMAGE_PIXELS) -> Slide:
    """Open a slide or image file with the first reader that understands it.

    OpenSlide first (it identifies its formats by content), then Pillow for plain images
    (read whole: at most ``max_plain_pixels`` pixels), then large_image (refused when the
    file is a truncated or corrupt TIFF, :func:`tiff_damage`).

    Raises
    ------
    WsicellError
        Missing file, a directory, or a file no reader can open (e.g. text named .svs).
    """
    import openslide

    path = existing_file(path)
    try:
        detected = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        detected = None
    if detected is not None:
        return OpenSlideSlide(path)
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        try:
            return ImageSlide(path, max_plain_pixels)
        except WsicellError:
            if path.suffix.lower() not in (".tif", ".tiff"):
                raise
    return LargeImageSlide(path)


def check_mpp(mpp: float, where: str | Path = "--mpp") -> float:
    """``mpp`` (a given level-0 resolution, um/px) as a float when it lies in
    :data:`~wsicell.config.MPP_RANGE`.

    Raises
    ------
    WsicellError
        NaN, infinite, or outside the range: ``<where>: --mpp ... is not a microscope's
        resolution``.

    Examples
    --------
    >>> check_mpp(0.25)
    0.25
    """
    low, high = MPP_RANGE
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if not low <= value <= high:  # NaN fails too
        raise WsicellError(f"{where}: --mpp {mpp} um/px is outside {low:g}-{high:g} um/px: "
                           "not a microscope's resolution (check the value and its unit)")
    return value


def resolve_mpp(slide: Slide, mpp: float | None, reference_mpp: float) -> float:
    """The level-0 microns per pixel to work with.

    ``mpp`` (the user's override) wins; then the file's metadata.  A one-level image
    without metadata is taken at ``reference_mpp`` with a warning; a pyramid without
    metadata is an error (its levels would be guessed at the wrong scale).
    """
    if mpp is not None:
        return check_mpp(mpp, slide.path)
    if slide.mpp is not None:
        return slide.mpp
    if slide.level_count > 1:
        raise WsicellError(
            f"{slide.path}: pyramidal slide without microns-per-pixel metadata; pass --mpp"
        )
    warnings.warn(
        f"{slide.path}: no microns-per-pixel metadata; taking it at the reference "
        f"resolution {reference_mpp} um/px (pass --mpp to set it)",
        stacklevel=2,
    )
    return float(reference_mpp)


@dataclass(frozen=True)
class ReferenceGrid:
    """The slide resampled to the reference resolution.

    Attributes
    ----------
    scale : float
        Level-0 pixels per reference pixel (``reference_mpp / slide_mpp``).
    width, height : int
        Size of the slide in reference pixels.
    """

    scale: float
    width: int
    height: int

    @classmethod
    def of(cls, slide: Slide, slide_mpp: float, reference_mpp: float) -> "ReferenceGrid":
        scale = reference_mpp / slide_mpp
        if abs(scale - 1) < 1e-9:
            scale = 1.0
        width = max(1, math.floor(slide.width / scale + 1e-9))
        height = max(1, math.floor(slide.height / scale + 1e-9))
        return cls(scale, width, height)

    def to_level0(self, coords: np.ndarray) -> np.ndarray:
        """Reference-pixel coordinates (pixel centres at integers) to level-0 ones."""
        return (np.asarray(coords, dtype=np.float64) + 0.5) * self.scale - 0.5


def _pick_level(slide: Slide, scale: float) -> tuple[int, int]:
    """The finest level whose downsample is <= ``scale`` and an integer box factor on it."""
    level = max(
        (i for i, d in enumerate(slide.level_downsamples) if d <= scale * (1 + 1e-6)),
        key=lambda i: slide.level_downsamples[i],
        default=0,
    )
    box = max(1, math.floor(scale / slide.level_downsamples[level] + 1e-6))
    return level, box


def read_reference_region(
    slide: Slide, grid: ReferenceGrid, x: int, y: int, width: int, height: int
) -> np.ndarray:
    """A window of the slide on the reference grid.

    The pixel is read from the finest pyramid level that is not finer than needed,
    reduced there by an integer box mean aligned to the level's origin, then resampled
    bilinearly (factor in [1, 2) down, or up) with pixel centres mapped exactly and
    weights quantised from global coordinates, so a reference pixel's value does not
    depend on the window it is read in (tiles equal a whole read bit for bit).

    Parameters
    ----------
    slide : Slide
    grid : ReferenceGrid
    x, y : int
        Top-left corner in reference pixels.
    width, height : int
        Size in reference pixels.

    Returns
    -------
    ndarray, shape (height, width, 3), uint8
    """
    if grid.scale == 1.0:
        return slide.read_level_region(0, x, y, width, height)
    level, box = _pick_level(slide, grid.scale)
    ratio = grid.scale / (slide.level_downsamples[level] * box)  # source px per output px
    src_x0 = math.floor((x + 0.5) * ratio - 0.5) - 1
    src_y0 = math.floor((y + 0.5) * ratio - 0.5) - 1
    src_x1 = math.ceil((x + width - 0.5) * ratio - 0.5) + 2
    src_y1 = math.ceil((y + height - 0.5) * ratio - 0.5) + 2
    source = slide.read_level_region(
        level, src_x0 * box, src_y0 * box, (src_x1 - src_x0) * box, (src_y1 - src_y0) * box
    )
    if box > 1:
        source = cv2.resize(
            source, (src_x1 - src_x0, src_y1 - src_y0), interpolation=cv2.INTER_AREA
        )
    map_x, frac_x = _fixed_point_coords(x, width, ratio, src_x0)
    map_y, frac_y = _fixed_point_coords(y, height, ratio, src_y0)
    coords = np.empty((height, width, 2), dtype=np.int16)
    coords[..., 0] = map_x[None, :]
    coords[..., 1] = map_y[:, None]
    fractions = ((frac_y[:, None] << _INTER_BITS) | frac_x[None, :]).astype(np.uint16)
    return cv2.remap(source, coords, fractions, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


_INTER_BITS = 5  # OpenCV's fixed-point resolution of interpolation weights (1/32 px)


def _fixed_point_coords(start: int, count: int, ratio: float, src_start: int):
    """Source positions of output pixels ``start..start+count`` in OpenCV's fixed-point form.

    Computed from the *global* output index, so the integer part (relative to the source
    window) and the 1/32-pixel fraction do not depend on where the window starts.
    """
    centres = (np.arange(start, start + count, dtype=np.float64) + 0.5) * ratio - 0.5
    fixed = np.round(centres * (1 << _INTER_BITS)).astype(np.int64)
    return ((fixed >> _INTER_BITS) - src_start).astype(np.int16), fixed & ((1 << _INTER_BITS) - 1)


def find_slide_files(paths) -> list[Path]:
    """Expand the command line's paths: files as given, directories to their slides.

    Directories are searched recursively for files whose suffix is a slide or image
    format, in sorted order.

    Raises
    ------
    WsicellError
        A path that does not exist, or a directory without slides.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise WsicellError(f"{path}: no such file or directory")
        if path.is_dir():
            inside = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            )
            if not inside:
                raise WsicellError(f"{path}: directory contains no slide or image files")
            found.extend(inside)
        else:
            found.append(path)
    return found
