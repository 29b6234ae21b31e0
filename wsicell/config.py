"""One typed, validated configuration for every stage of wsicell.

Every output wsicell writes records the :class:`WsicellConfig` that produced it
(``config.model_dump(mode="json")``) together with the wsicell version, so a result
can always be traced back to its parameters.  The JSON Schema of this object lives in
``schemas/config.schema.json`` (regenerate with ``python -m wsicell.config``).

Units are part of every field's description.  Pixel sizes of the segmentation are
given *at the reference resolution* ``segmentation.reference_mpp`` (the resolution of
the paper's bone-marrow images); images at another resolution are resampled to it
before segmentation, so the same tissue gives the same cells at 20x and 40x.  The
default segmentation, the ``adaptive`` method (``segmentation.method``), instead has its
sizes in microns (``segmentation.adaptive``) and calibrates itself on each slide; the
paper's fixed-threshold recipe is the ``paper`` preset, unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from wsicell.errors import WsicellError
from wsicell.files import read_json

Triple = tuple[float, float, float]
#: Plausible level-0 resolutions, um/px: a slide's metadata outside is ignored, an ``--mpp``
#: outside is refused (0.02: beyond any light microscope; 20: a macro overview camera).
MPP_RANGE = (0.02, 20.0)


class _Section(BaseModel):
    # NaN and infinity are no value of any field (an infinite epoch count would never end)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StainConfig(_Section):
    """Reinhard normalisation and Macenko stain separation (method section 1.1-1.2)."""

    target_lab_mean: Triple = Field(
        (8.98, 0.08, 0.02),
        description="Reinhard target mean of the Ruderman l-alpha-beta channels (log-LMS based, "
        "dimensionless); the paper's standard.",
    )
    target_lab_std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (0.64, 0.11, 0.03),
        description="Reinhard target standard deviation of the l-alpha-beta channels.",
    )
    macenko_min_magnitude: float = Field(
        16.0, ge=0, description="Optical-density (SDA, 0..255) magnitude below which pixels are "
        "ignored by the Macenko PCA (background)."
    )
    macenko_angle_percentiles: tuple[float, float] = Field(
        (0.01, 0.99), description="Lower and upper percentile (fractions) of the angle "
        "distribution that give the two stain vectors."
    )
    fit_max_pixels: int = Field(
        65536, ge=0, description="Statistics and stain vectors of an image are estimated on "
        "an evenly strided subset of at most this many pixels (0 = all pixels)."
    )
    hematoxylin_reference: Triple = Field(
        (0.65, 0.70, 0.29),
        description="Reference optical-density colour of hematoxylin (RGB), used to identify "
        "the hematoxylin vector among the estimated ones.",
    )


class AdaptiveConfig(_Section):
    """The ``adaptive`` recipe (:mod:`wsicell.segmentation.adaptive`): self-calibrating,
    applied at the image's own resolution.  Lengths in um, areas in um2; ``*_rel`` are
    multiples of the nucleus radius calibrated on each image (or of its square)."""

    max_stain_gain: float = Field(1.5, ge=0, description="Largest contrast gain of the "
                                  "colour normalisation before the stain fit (target over "
                                  "source Lab standard deviation): a field without nuclei "
                                  "keeps its noise as noise (0: no limit).")
    max_hematoxylin_angle: float = Field(18.0, ge=0, le=90, description="Largest angle "
                                         "(degrees) between the fitted hematoxylin vector "
                                         "and ``stain.hematoxylin_reference``; a fit further "
                                         "off (fields of fat, blood, glass: 12-30 degrees, "
                                         "median 23; dev images 4-16, CoNSeP patches median "
                                         "13) takes the reference instead (0: no limit).")
    smooth_um: float = Field(0.25, ge=0, description="Gaussian sigma (um) on the "
                             "hematoxylin optical density.")
    tophat_radius_um: float = Field(6.0, ge=0, description="Radius (um) of the disk whose "
                                    "grey opening is the local background removed (white "
                                    "top-hat); 0 disables.")
    threshold_scale: PositiveFloat = Field(1.0, description="Multiplier on Otsu's threshold "
                                           "of the top-hat optical density.")
    min_threshold: float = Field(0.0, ge=0, description="Floor of the calibrated threshold "
                                 "(top-hat optical density): where a field has no hematoxylin "
                                 "mode Otsu's threshold lands in the stroma, fat or blood.")
    prior_threshold: float = Field(0.2, ge=0, description="Core threshold (top-hat optical "
                                   "density) of a field without a hematoxylin mode, one "
                                   "where fewer than ``min_mode_share`` of the pixels reach "
                                   "it (fat, blood, stroma, glass): its objects are kept "
                                   "only with ``min_area_um2`` over it (0 disables).")
    min_mode_share: float = Field(0.02, ge=0, le=1, description="Share of a field's pixels "
                                  "whose top-hat optical density must exceed "
                                  "``prior_threshold`` for the field to have a hematoxylin "
                                  "mode (whole dev images 4-12%; 95 of the 102 nucleus-free "
                                  "fields of the negative control under 2%).")
    max_hole_um2: float = Field(60.0, ge=0, description="Holes of the foreground up to this "
                                "area (um2) are filled: the pale centres of large vesicular "
                                "nuclei (bm_graz precision 0.849 at 30 um2, 0.853 "
                                "at 60; the other dev sets unchanged).")
    radius_range_um: tuple[PositiveFloat, PositiveFloat] = Field(
        (1.0, 4.0), description="Clamp (um) of the calibrated nucleus radius.")
    radius_prior_um: PositiveFloat = Field(2.0, description="Nucleus radius (um) taken when "
                                           "fewer than 5 objects calibrate it.")
    radius_min_area_um2: float = Field(5.0, ge=0, description="Foreground components at "
                                       "least this large (um2) calibrate the radius.")
    marker_sigma_rel: float = Field(0.5, ge=0, description="Gaussian sigma on the distance "
                                    "transform, x radius.")
    marker_radius_rel: PositiveFloat = Field(0.6, description="A marker is the maximum of the "
                                             "smoothed distance within this radius, x radius.")
    min_marker_rel: float = Field(0.7, ge=0, description="A marker lies at least this far "
                                  "from the background, x radius.")
    min_area_rel: float = Field(2.5, ge=0, description="Objects under this x radius^2 are "
                                "dropped.")
    min_area_um2: float = Field(2.0, ge=0, description="Absolute floor (um2) of the smallest "
                                "object, and of its core in a field without a hematoxylin "
                                "mode (``prior_threshold``).")
    min_source_px: float = Field(40.0, ge=0, description="Objects smaller than this many "
                                 "pixels of the source image are dropped where it is coarser "
                                 "than the grid segmented (a 20x image at 0.4 um/px: 10 um2 at "
                                 "0.5 um/px): specks and slivers a few pixels across, not "
                                 "nuclei (BRCA dev, 0.5 um/px: 80% of the objects under 10 "
                                 "um2 match no nucleus); 0 disables.")
    min_peak_contrast: float = Field(0.2, ge=0, description="Objects whose highest contrast "
                                     "(top-hat optical density) stays under this are "
                                     "dropped: faint specks and stain noise, not nuclei "
                                     "(dev images' nuclei: 99.5th percentile 0.23-0.49).")
    min_width_um: float = Field(0.0, ge=0, description="Objects whose largest inscribed "
                                "circle (distance transform of the foreground) is narrower "
                                "than this (um) are dropped: membranes between fat cells, "
                                "collagen fibres, keratin slivers (0 disables).")
    max_eosin_ratio: float = Field(0.5, ge=0, description="Objects whose mean eosin optical "
                                   "density over their mean hematoxylin optical density "
                                   "exceeds this are dropped: red cells and eosinophilic "
                                   "debris, not nuclei (median 0.43 on red cells, 0.16-0.26 "
                                   "on nuclei; 0 disables; skipped on grayscale images).")
    mesh_area_rel: float = Field(30.0, ge=0, description="Foreground components at least "
                                 "this x radius^2 whose solidity is under "
                                 "``mesh_max_solidity`` are meshes, not clumps of nuclei "
                                 "(keratin lamellae, collagen): their pieces are dropped "
                                 "(0 disables). CMU-1's keratin: 503 -> 245 objects, the dev "
                                 "sets within 0.001.")
    mesh_max_solidity: float = Field(0.35, ge=0, le=1, description="Solidity (pixels over "
                                     "the area of the convex hull) under which a component "
                                     "of at least ``mesh_area_rel`` x radius^2 is a mesh "
                                     "(0.40-0.45 removed more keratin but cost MoNuSeg AJI "
                                     "0.003-0.005).")
    rejoin_threshold_rel: float = Field(0.0, ge=0, le=1, description="Second pass for "
                                        "nuclei the tests dropped in pieces: the components of "
                                        "the foreground at this x the threshold, outside the "
                                        "kept objects, that hold a pixel over the threshold, "
                                        "split and tested like the first pass's (0 disables). "
                                        "At 0.5: CoNSeP test detection F1 0.613 -> 0.650, "
                                        "MoNuSeg AJI 0.451 -> 0.457, but bm_graz precision "
                                        "0.853 -> 0.746 (marrow cytoplasm), BRCA dev 0.772 -> 0.762.")
    max_area_um2: PositiveFloat = Field(250.0, description="Objects larger than this (um2) "
                                        "after splitting are refused (removed and counted).")

    @property
    def stain_fit(self) -> dict:
        """Keyword arguments of :func:`wsicell.segmentation.stain.fit_stain_parameters`
        for this recipe."""
        return {"max_gain": self.max_stain_gain,
                "max_hematoxylin_angle": self.max_hematoxylin_angle}


class SegmentationConfig(_Section):
    """Nuclei segmentation (method section 1.3-1.5). Pixel sizes hold at ``reference_mpp``."""

    preset: str = Field("paper", description="Name of the preset these values came from.")
    reference_mpp: PositiveFloat = Field(
        0.4, description="Microns per pixel at which the pixel sizes below hold (the paper's "
        "bone-marrow images; estimated from nucleus sizes, they carry no metadata)."
    )
    hematoxylin_threshold: int = Field(
        120, ge=1, le=255, description="Hematoxylin intensity (0..255, dark = much stain) below "
        "which a pixel is nucleus foreground."
    )
    max_hole_px: int = Field(
        1000, ge=0, description="Holes of the foreground up to this size (pixels at "
        "reference_mpp) are filled; larger ones are gaps in the tissue, not parts of a "
        "nucleus (0 fills all, which makes results depend on the tiling of a slide)."
    )
    min_area_px: PositiveInt = Field(
        200, description="Objects smaller than this (pixels at reference_mpp) are removed after "
        "hole filling."
    )
    min_fragment_px: int = Field(
        0, ge=0, description="Pieces smaller than this (pixels at reference_mpp) left by the "
        "opening or the split are dropped; 0 keeps them all, as the paper does."
    )
    max_size_px: int = Field(
        60, ge=0, description="Objects whose bounding box is longer than this (pixels at "
        "reference_mpp) are dropped: clumps and stain rings, not nuclei (0 keeps all). "
        "Whole-slide ingest needs ingest.halo > max_size_px so that a tile sees every "
        "nucleus it owns whole."
    )
    protrusion_width_px: int = Field(
        3, ge=0, description="Thin protrusions narrower than this (pixels at reference_mpp, "
        "elliptic opening) are removed; 0 disables."
    )
    opening_size_px: int = Field(
        7, ge=0, description="Side of the square structuring element of the opening that "
        "separates touching nuclei (pixels at reference_mpp); 0 disables."
    )
    split_touching: bool = Field(
        False, description="Split touching nuclei with a distance-transform watershed "
        "(not in the paper)."
    )
    split_min_depth_px: float = Field(
        1.5, ge=0, description="A distance-transform peak must rise this much (pixels) above "
        "its surroundings to seed its own nucleus."
    )
    crop_size: PositiveInt = Field(
        32, description="Side of the square RGB cell image (pixels at reference_mpp); larger "
        "nuclei are scaled down to fit."
    )
    method: Literal["threshold", "adaptive"] = Field(
        "threshold", description="threshold: the paper's fixed-threshold recipe with the "
        "pixel sizes above; adaptive: the self-calibrating recipe of the ``adaptive`` "
        "section, in microns (plain images at their native resolution; whole slides on the "
        "reference grid, calibrated once per slide on ingest's stain sample)."
    )
    adaptive: AdaptiveConfig = AdaptiveConfig()


class IngestConfig(_Section):
    """Whole-slide ingest: tiling, tissue detection and the Dask layout."""

    tile_size: PositiveInt = Field(
        2048, description="Side of a processing tile (pixels at the reference resolution)."
    )
    max_plain_image_pixels: PositiveInt = Field(
        1 << 31, description="Largest plain image (PNG, JPEG, plain TIFF), in pixels, that is "
        "read whole into memory; a larger one is refused before any pixel is decoded "
        "(pyramidal slides are read tile by tile and are not limited)."
    )
    halo: PositiveInt = Field(
        64, description="Overlap added around each tile (pixels at the reference resolution); "
        "must exceed the largest nucleus diameter."
    )
    tissue_mpp: PositiveFloat = Field(
        16.0, description="Resolution of the thumbnail used for tissue detection (um/px)."
    )
    min_tissue_fraction: float = Field(
        0.01, ge=0, le=1, description="A tile is processed when at least this fraction of it is "
        "tissue."
    )
    stain_sample_tiles: PositiveInt = Field(
        16, description="Number of tissue tiles sampled in pass 1 to estimate the slide's "
        "stain parameters."
    )
    shared_stain: bool = Field(
        False, description="Fit one colour standardisation (stain parameters) on the "
        "sampled tissue of all the images of one ingest run together, instead of one per "
        "slide: for patches cut from one slide or staining batch, so that a patch's colours "
        "do not depend on which cells it happens to hold. The adaptive recipe's calibration "
        "stays per image."
    )
    crops_per_chunk: PositiveInt = Field(
        4096, description="Crops per Zarr chunk of the cell store."
    )
    seed: int = Field(0, description="Seed of the tile sample of pass 1.")
    cells_per_chunk: PositiveInt = Field(
        65536, description="Cells per Zarr chunk of the cell table columns."
    )
    tiles_per_task: PositiveInt = Field(
        2, description="Tiles segmented by one Dask task (larger = less scheduler overhead, "
        "smaller = better balance at the end of a slide)."
    )


#: Per section, fields added after outputs began to record their configuration, with the
#: behaviour in force before them where their default is another one.
VALUES_BEFORE_FIELDS = {"train": {"nucleus_px": 0.0, "size_channel": 0.0}}


class TrainConfig(_Section):
    """GAN training (method section 2); defaults are the paper's, except ``lr_info``,
    ``lambda_marginal``, ``nucleus_px`` and ``size_channel``."""

    categories: PositiveInt = Field(5, description="k, the number of cell clusters.")
    noise_dim: PositiveInt = Field(32, description="Dimension of the Gaussian noise z.")
    batch_size: PositiveInt = Field(64, description="Crops per batch.")
    critic_steps: PositiveInt = Field(5, description="Critic steps per generator step.")
    lr: PositiveFloat = Field(1e-4, description="Adam learning rate of the critic and G steps.")
    lr_info: PositiveFloat = Field(
        1e-3, description="Adam learning rate of the Q step (G, trunk and Q head); the "
        "research code has it apart. Not the paper's: its 1e-4 leaves L_Q near ln(k) for "
        "hundreds of iterations; 1e-3 brought it below 0.3 within 150 on CoNSeP "
        "(docs/training.md) and every cell-type figure of docs/cell-types.md since uses it."
    )
    betas: tuple[float, float] = Field((0.5, 0.9), description="Adam betas.")
    lambda_gp: float = Field(10.0, ge=0, description="Gradient-penalty weight lambda1.")
    lambda_info: float = Field(1.0, ge=0, description="Mutual-information weight lambda2.")
    lambda_cluster: float = Field(
        0.0, ge=0, description="Beyond the paper: weight of a clustering term in the Q step, "
        "the mutual information of Q's categories between two random rotations / flips of "
        "each real crop (IIC, Ji et al. 2019), so that Q also splits real cells and not only "
        "G's samples (0 = the paper)."
    )
    lambda_marginal: float = Field(
        1.0, ge=0, description="Beyond the paper: weight of the entropy of Q's mean category "
        "distribution over two random rotations / flips of the real crops of the Q step's "
        "batch (SCAN, Van Gansbeke et al. 2020), so that Q spreads real cells over its "
        "categories instead of collapsing them into one (0 = the paper). On CoNSeP (3 seeds) "
        "it shrank the largest cluster from 75% to 60% of the cells and raised NMI from 0.022 "
        "to 0.038 on the train patches' cells (docs/cell-types.md)."
    )
    lambda_confidence: float = Field(
        0.0, ge=0, description="Beyond the paper: weight of the mean entropy of each real "
        "crop's category distribution in the Q step (minimised; same views as "
        "lambda_marginal). With lambda_marginal it maximises the mutual information between "
        "crops and categories (RIM / IMSAT): confident, evenly used categories (0 = off). On "
        "the demo's bone marrow it kept all 5 categories in use (2 without); on CoNSeP's "
        "train patches' cells (3 seeds) it did not help: purity 0.383 against 0.399, "
        "largest cluster up to 90% against 77% (docs/cell-types.md)."
    )
    continuous_codes: int = Field(
        0, ge=0, description="Beyond the paper: number of continuous codes u ~ U(-1, 1) that "
        "G takes beside the categorical code and Q estimates (InfoGAN's, Chen et al. 2016; "
        "loss lambda_info * 0.5 * squared error), so that continuous variation such as a "
        "nucleus's size can go there instead of into the categories (0 = the paper)."
    )
    nucleus_px: float = Field(
        28.0, ge=0, le=32, description="Beyond the paper: each crop's nucleus is scaled "
        "(bilinear, centred) so that the longer side of its box spans this many pixels "
        "before the critic and Q see it, in training and in classification, so that the "
        "categories cannot be the nuclei's sizes (the cell table keeps the sizes); 0 = the "
        "crops as stored (the paper). On CoNSeP (3 seeds) it raised Q's test purity from "
        "0.445 to 0.50 and its NMI from 0.04 to 0.10 (docs/cell-types.md)."
    )
    size_channel: float = Field(
        1.0, ge=0, le=1, description="Beyond the paper: weight of a fourth input channel, a "
        "constant plane holding each nucleus's size measured on its crop as stored "
        "(sqrt(area in pixels) / 16 - 1, times this weight), which G generates beside its "
        "image; the critic and Q see it, so that with nucleus_px the categories can still "
        "use size beside shape and stain (0 = off, the paper's three channels). With "
        "nucleus_px 28, 3 seeds, train cells: CoNSeP purity 0.519 -> 0.531, BRCA-M2C 0.552 "
        "-> 0.638 (NMI 0.090 -> 0.163) (docs/cell-types.md)."
    )
    average_decay: float = Field(
        0.0, ge=0, lt=1, description="Beyond the paper: the networks kept after training "
        "(the saved model that classifies, its D features and pictures, and the occupancy "
        "watch) are a moving average of the trained ones, this decay per iteration once "
        "warmed up (0.995: about the last 200 iterations; after n iterations the decay is "
        "min(decay, (1 + n) / (10 + n)), so a short run averages about its last tenth), "
        "instead of the last iteration's (0, the paper). Paired with the same training's "
        "last networks, 3 seeds, 1,000 iterations, train cells: CoNSeP purity 0.534 -> "
        "0.546, BRCA-M2C 0.620 -> 0.596, NMI lower on both; the largest cluster 0.45 -> "
        "0.27 at most. Not the default (docs/cell-types.md)."
    )
    epochs: PositiveFloat = Field(10, description="Passes over the training crops.")
    width: PositiveInt = Field(128, description="Channels of the residual networks.")
    rotate: bool = Field(True, description="Augment by rotations of 90/180/270 degrees.")
    stain_augment: float = Field(
        0.0, ge=0, description="Std of the random hematoxylin/eosin optical-density "
        "perturbation (0 = off)."
    )
    seed: int = Field(0, description="Random seed.")
    amp: bool | None = Field(
        None, description="bf16 autocast of the forward passes (the gradient penalty always "
        "runs in float32). Default (auto): on for a CPU with native bfloat16 (AVX-512 BF16 or "
        "AMX; 1.5-2x the float32 iterations per second on a 2-core EPYC, docs/training.md), "
        "off on a GPU: at the paper's batch 64 it made iterations 8-14% slower on an H200 "
        "(docs/training.md, On a GPU)."
    )
    shuffle_buffer: PositiveInt = Field(
        16384, description="Crops shuffled together by each data stream (on top of the "
        "per-epoch shuffle of Zarr chunks)."
    )


class PredictConfig(_Section):
    """Cell labelling and slide-level prediction (method section 3)."""

    region_size_um: PositiveFloat = Field(
        500.0, description="Side of the square regions of the proportion grid (um)."
    )
    slide_clusters: PositiveInt = Field(2, description="k-means clusters of slides.")
    folds: PositiveInt = Field(4, description="Cross-validation folds of the slide SVM.")
    batch_size: PositiveInt = Field(1024, description="Crops per inference batch.")


class WsicellConfig(_Section):
    """Every parameter of the pipeline, one section per stage."""

    stain: StainConfig = StainConfig()
    segmentation: SegmentationConfig = SegmentationConfig(preset="adaptive", method="adaptive")
    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()

    @model_validator(mode="after")
    def _halo_holds_a_nucleus(self) -> "WsicellConfig":
        if self.segmentation.max_size_px and self.ingest.halo <= self.segmentation.max_size_px:
            raise ValueError(
                f"ingest.halo ({self.ingest.halo}) must exceed segmentation.max_size_px "
                f"({self.segmentation.max_size_px}) so that tiles see their nuclei whole"
            )
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "WsicellConfig":
        """Read and validate a JSON configuration file (missing fields take defaults).

        Raises
        ------
        WsicellError
            Missing file, invalid JSON or values that fail validation.
        """
        path = Path(path)
        try:
            return cls.model_validate(read_json(path, "JSON configuration"))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            where = f" at {where}" if where else ""
            raise WsicellError(f"{path}: invalid configuration{where}: {first['msg']}") from None

    @classmethod
    def from_record(cls, data: dict) -> "WsicellConfig":
        """The configuration an output recorded (a trained model, a checkpoint).

        A field the record lacks because it was added later takes the value that was in
        force before it (:data:`VALUES_BEFORE_FIELDS`), not today's default: a model saved
        before ``train.nucleus_px`` existed saw its crops as stored, one saved before
        ``train.size_channel`` existed has three input channels.
        """
        data = {section: {**VALUES_BEFORE_FIELDS.get(section, {}), **values}
                if isinstance(values, dict) else values for section, values in data.items()}
        return cls.model_validate(data)

    def with_options(self, preset: str | None = None, **sections: dict) -> "WsicellConfig":
        """This configuration with options given over it (a command line's, a notebook's).

        Parameters
        ----------
        preset : str, optional
            A segmentation preset replacing the ``segmentation`` section.
        **sections : dict
            Per section (``stain``, ``segmentation``, ``ingest``, ``train``, ``predict``), the
            fields to set; a value of None is an option that was not given and changes
            nothing.

        Returns
        -------
        WsicellConfig
            Validated as a whole (the checks across sections included).

        Raises
        ------
        WsicellError
            An unknown section or field, or a value that fails validation.

        Examples
        --------
        >>> config = WsicellConfig().with_options(train={"width": 16, "lr_info": 1e-3,
        ...                                              "epochs": None})
        >>> config.train.width, config.train.lr_info, config.train.epochs
        (16, 0.001, 10.0)
        """
        data = self.to_json()
        if preset:
            data["segmentation"] = segmentation_preset(preset).model_dump(mode="json")
        for section, options in sections.items():
            if section not in type(self).model_fields:
                raise WsicellError(f"unknown configuration section {section!r}")
            data[section] = {**data[section],
                             **{k: v for k, v in options.items() if v is not None}}
        try:
            return type(self).model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise WsicellError(f"invalid configuration option {where}: {first['msg']}") from None

    def to_json(self) -> dict:
        """The configuration as plain JSON data, as recorded in outputs."""
        return self.model_dump(mode="json")


SEGMENTATION_PRESETS: dict[str, SegmentationConfig] = {
    # The paper's recipe, as published.
    "paper": SegmentationConfig(preset="paper"),
    # Keeps the small nuclei the 200 px cut loses (erythroblasts, lymphocytes) and drops
    # the slivers the opening leaves.  Chosen on 4 of the 8 annotated bm_graz images,
    # checked on the other 4 (docs/segmentation.md, "Detection").
    "sensitive": SegmentationConfig(preset="sensitive", min_area_px=100, min_fragment_px=80),
    # Solid tissue with packed, elongated or pale nuclei (colorectal: CoNSeP): a looser
    # threshold, a narrow opening that keeps spindle nuclei, small nuclei kept, touching
    # nuclei split.  Chosen on every 6th CoNSeP train patch, checked on the test patches
    # (docs/segmentation.md, "Detection").
    "tissue": SegmentationConfig(preset="tissue", hematoxylin_threshold=140, min_area_px=40,
                                 min_fragment_px=30, opening_size_px=3, split_touching=True),
    # Self-calibrating and in microns (wsicell.segmentation.adaptive): one configuration
    # chosen on the train splits of MoNuSeg, CoNSeP and bm_graz together
    # (docs/segmentation.md, "The default: adaptive").  Ingest calibrates it once per slide (its stain sample).
    "adaptive": SegmentationConfig(preset="adaptive", method="adaptive"),
}


def segmentation_preset(name: str) -> SegmentationConfig:
    """Return the named segmentation preset (a key of :data:`SEGMENTATION_PRESETS`)."""
    try:
        return SEGMENTATION_PRESETS[name]
    except KeyError:
        raise WsicellError(
            f"unknown segmentation preset {name!r}; choose from {sorted(SEGMENTATION_PRESETS)}"
        ) from None


def load_config(path: str | Path | None = None, preset: str | None = None,
                **sections: dict) -> WsicellConfig:
    """The configuration of a command: a JSON file (or the defaults), then the command's
    options over it (:meth:`WsicellConfig.with_options`)."""
    config = WsicellConfig.from_file(path) if path else WsicellConfig()
    return config.with_options(preset, **sections)


def config_schema() -> dict:
    """JSON Schema of :class:`WsicellConfig`."""
    return WsicellConfig.model_json_schema()


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.json"
    out.write_text(json.dumps(config_schema(), indent=2) + "\n")
    print(out)
