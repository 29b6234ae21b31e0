"""Cell types on CoNSeP and BRCA-M2C: do Q's clusters beat the paper's baselines, across seeds?

    .venv/bin/python benchmarks/cell_types.py [--sets consep brca] [--work DIR]
        [--preset NAME] [--seeds 0 1 2] [--width 16] [--set FIELD=VALUE ...]
        [--max-iters N] [--score-every N] [--threads 1]

    smoke run (a few patches per split, about two minutes):  --smoke

Two annotated sets, the same steps and the same cells for every method:

- ``consep``: CoNSeP (colon, 256x256 patches at 40x = 0.25 um/px; ``type_mat/*.mat``:
  ``inst_centroid`` x, y and ``inst_type`` 1 miscellaneous, 2 inflammatory, 3 epithelial,
  4 spindle-shaped), split into train / test as the data set is (its folder names).
- ``brca``: BRCA-M2C (breast, 80 TCGA patches at 0.5 um/px; ``points/*.csv`` dots
  ``x,y,label``: lymphocyte, tumor, stromal), split **by patient** here (the data holds only
  BRCA-M2C's own train split): the patient is the TCGA case id, the first 12 characters of
  the file name (``TCGA-A7-A0DA``; a case's two slides DX1 / DX2 stay together); the sorted
  case ids at positions 3, 7, 11, ... (every fourth) are ``test``, the others ``train``
  (:func:`brca_split`: 18 of 75 cases, 20 of 80 patches).

Per set:

1. Ingest the patches (one slide each) into ``WORK/<set>-<preset>.zarr`` with the default
   segmentation of ``WsicellConfig()`` unless ``--preset`` names another; ingest skips slides
   already complete, so re-runs reuse the store.  With ``--stain source`` the patches cut
   from one source image share one stain fit (``ingest.shared_stain``, one ingest run per
   source: CoNSeP's original 1000 px tile, the name before the last ``_``; BRCA-M2C's
   slide, the name before the first ``_``), so that a patch's colours do not depend on
   which cells it holds (store ``WORK/<set>-<preset>-source-stain.zarr``).
2. Per seed, train k=5 on the **train** patches' cells only, unsupervised, with the defaults
   of ``wsicell train`` except the CPU sizing (``--width``) and any ``--set`` field of the
   ``train`` configuration (``WORK/model-<hash>-seed<N>``; a finished model with the same
   settings is reused, an interrupted one resumed).  Training runs in stages of
   ``--score-every`` iterations, each resumed from the previous stage's checkpoint, and Q is
   scored after each stage: **purity against generator iterations** (the paper's Fig. 9b),
   printed per seed and written to ``WORK/<set>-curve.csv``.  The final model is the one
   scored in the table; no checkpoint or setting is chosen by the test labels.
3. Match cells one-to-one to the annotated points within ``--radius-um``
   (``wsicell.analysis.evaluation.matched_rows``).
4. Baselines, each with the same seeds and k, **fitted on all the train patches' cells**
   (as Q is; no labels) and applied to every cell: k-means on the trained model's D features
   (``d_kmeans``: StandardScaler, PCA to 50, k-means), k-means on a 50-component PCA of the
   pixels (``pixel_pca``), the paper's hand-made features + k-means (``handmade``, "MF +
   k-means", ``wsicell.learning.baseline``), HOG + DEC (``hog_dec``, the paper's strongest
   Table III baseline: ``skimage.feature.hog``'s features, ``wsicell.learning.dec``) and
   k-means on standardised mask shape / size / stain features (``mask``, :func:`mask_features`).
5. Describe the annotated types, and each seed's Q clusters, as the report describes
   clusters (``wsicell.analysis.cluster_descriptions``: median area, roundness, darkness
   ranked within each patch: "small, round, dark").
6. Score every method on the matched cells of the train patches (``train_*``: the figures to
   choose settings by) and of the test patches (the figures to report): purity, entropy,
   F-score (``wsicell.analysis.metrics.clustering_score``), NMI, ARI (scikit-learn) and the
   cluster sizes, per seed and as means.

Ends with ``name: value`` lines per set, prefixed ``consep_`` / ``brca_`` (test cells; the
same with ``<set>_train_`` for the train cells): ``purity_mean``, ``purity_min``,
``nmi_mean``, ``ari_mean`` of Q, ``largest_cluster_fraction`` (Q's largest cluster over the
scored cells, the **max** over seeds), ``best_baseline_purity`` / ``_nmi`` / ``_ari`` (the
best baseline's mean over seeds, each figure's best), ``minutes`` (the set's wall time); the
last line, ``minutes``, is the wall time of the whole run.  ``--points-only OUT_DIR`` writes
each set's types as points CSVs (``OUT_DIR/<set>/``) for ``wsicell evaluate clustering``.

Data: S. Graham et al., "HoVer-Net", Medical Image Analysis 2019 (CoNSeP), 256x256 cut;
S. Abousamra et al., "Multi-Class Cell Detection Using Spatial Context Representation",
ICCV 2021 (BRCA-M2C).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
from skimage.color import rgb2hed
from skimage.measure import label, regionprops
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wsicell.analysis.cluster_descriptions import axis_ratio, describe_clusters
from wsicell.analysis.evaluation import matched_rows
from wsicell.analysis.metrics import clustering_score
from wsicell.config import IngestConfig, WsicellConfig
from wsicell.io.store import (
    complete_slides,
    open_store,
    slide_cells,
    slide_crops,
    slide_masks,
)
from wsicell.learning.baseline import grayscale, handmade_features, hog_features
from wsicell.segmentation.measurements import inertia_axes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
K = 5
CONSEP_TYPES = {1: "miscellaneous", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
SCORES = ("purity", "entropy", "fscore", "nmi", "ari", "largest")
SMOKE = {"limit": 6, "max_iters": 4, "score_every": 2, "seeds": [0],
         "options": ["batch_size=16"]}


def brca_case(path: Path) -> str:
    """TCGA case (patient) id of a BRCA-M2C file: the first 12 characters of its name."""
    return path.name[:12]


def brca_split(images: list[Path]) -> dict[str, str]:
    """``train`` / ``test`` of each BRCA-M2C image stem, by case: every fourth sorted case
    (positions 3, 7, 11, ...) is ``test``.

    Examples
    --------
    >>> split = brca_split([Path(f"TCGA-A7-A0{i:02d}-01Z-00-DX1_x.png") for i in range(8)])
    >>> [split[f"TCGA-A7-A0{i:02d}-01Z-00-DX1_x"] for i in range(8)].count("test")
    2
    """
    cases = sorted({brca_case(p) for p in images})
    test = set(cases[3::4])
    return {p.stem: "test" if brca_case(p) in test else "train" for p in images}


@dataclass(frozen=True)
class CellSet:
    """One annotated set: its patches, their pixel size, their split and their points."""

    name: str
    data: Path
    mpp: float

    def images(self, limit: int | None = None) -> list[Path]:
        """Train then test images (``limit`` of each split, spread over it, when given)."""
        if self.name == "consep":
            parts = [sorted((self.data / "images" / s).glob("*.jpg")) for s in ("train", "test")]
        else:
            files = sorted((self.data / "images").glob("*.png"))
            split = brca_split(files)
            parts = [[f for f in files if split[f.stem] == s] for s in ("train", "test")]
        if limit:
            parts = [p[:: max(1, len(p) // limit)][:limit] for p in parts]
        return parts[0] + parts[1]

    def source(self, image: Path) -> str:
        """The image a patch was cut from: CoNSeP's original tile, BRCA-M2C's slide."""
        return image.stem.rsplit("_", 1)[0] if self.name == "consep" else image.stem.split("_")[0]

    def splits(self, images: list[Path]) -> dict[str, str]:
        """Split (``train`` / ``test``) of each image's slide id."""
        from wsicell.pipeline.tiles import slide_id_for

        split = (brca_split(images) if self.name == "brca"
                 else {p.stem: p.parent.name for p in images})
        return {slide_id_for(p): split[p.stem] for p in images}

    def points(self, image: Path) -> pd.DataFrame:
        """Annotated nuclei of one image: ``x``, ``y`` (level-0 pixels), ``label`` (type)."""
        if self.name == "brca":
            from wsicell.io.points import read_points

            return read_points(self.data / "points" / f"{image.stem}.csv")
        mat = scipy.io.loadmat(self.data / "type_mat" / image.parent.name / f"{image.stem}.mat")
        xy = mat["inst_centroid"].astype(float).reshape(-1, 2)
        kinds = mat["inst_type"].ravel().astype(int)
        return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1],
                             "label": [CONSEP_TYPES[k] for k in kinds]})

    def write_points(self, out: Path, images: list[Path]) -> None:
        """One ``<slide id>.csv`` (``x,y,label``) per image in a fresh ``out``."""
        from wsicell.pipeline.tiles import slide_id_for

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for image in images:
            self.points(image).to_csv(out / f"{slide_id_for(image)}.csv", index=False)


def cell_sets(data: Path) -> dict[str, CellSet]:
    return {"consep": CellSet("consep", data / "consep_patches", 0.25),
            "brca": CellSet("brca", data / "brca_m2c", 0.5)}


def ingest_patches(images: list[Path], store: Path, mpp: float, workers: int,
                   preset: str | None, sources: list[str] | None = None
                   ) -> tuple[list[str], int]:
    """Ingest the patches (one slide each); returns the ids of the ingested slides and the
    number of patches ingest refused (no tissue, too few stained pixels), each reported.
    The thumbnail for tissue detection is made fine enough for 64 um patches.  With
    ``sources`` (one name per image), the images of one source are ingested together with
    one shared stain fit, on one LocalCluster for all."""
    from wsicell.errors import WsicellError
    from wsicell.pipeline.cluster import local_cluster
    from wsicell.pipeline.ingest import ingest
    from wsicell.pipeline.tiles import slide_id_for

    shared = sources is not None
    config = WsicellConfig(ingest=IngestConfig(tissue_mpp=1.0, min_tissue_fraction=0.0,
                                               shared_stain=shared)).with_options(preset)
    groups = ({s: [i for i, src in zip(images, sources) if src == s] for s in sources}
              if shared else {"": images})

    def run(group: list[Path], **cluster) -> None:
        try:
            with warnings.catch_warnings():  # one warning per refused patch; the error counts
                warnings.simplefilter("ignore")
                ingest(store, group, config, mpp=mpp, progress=False, **cluster)
        except WsicellError as err:
            print(err)

    if shared:
        with local_cluster(workers, 1, "4GB", None) as cluster:
            for group in groups.values():
                run(group, scheduler=cluster.scheduler_address)
    else:
        run(images, workers=workers)
    complete = set(complete_slides(open_store(store)))
    slides = [slide_id_for(image) for image in images if slide_id_for(image) in complete]
    return slides, len(images) - len(slides)


def load_cells(store: Path, slides: list[str], split: dict[str, str], points: Path,
               radius: float) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Every cell of the slides with its split and annotated type, its crop and its mask.

    Returns
    -------
    cells : DataFrame
        The store's cell columns plus ``slide_id``, ``split`` (``train`` / ``test``) and
        ``label`` (the matched type, empty for a cell matched to no annotation).
    crops : ndarray, shape (N, 32, 32, 3), uint8
    masks : ndarray, shape (N, 32, 32), bool
        The nucleus masks (``wsicell.io.store.slide_masks``), same geometry as the crops.
    """
    root = open_store(store)
    tables = [slide_cells(root, s).assign(slide_id=s, cell=lambda t: np.arange(len(t)))
              for s in slides]
    cells = pd.concat(tables, ignore_index=True)
    cells["split"] = cells.slide_id.map(split)
    with warnings.catch_warnings():  # the patches ingest refused have no slide
        warnings.simplefilter("ignore")
        matched = matched_rows(store, points, radius)
    matched = matched.assign(slide_id=matched.slide_id.astype(str))
    cells = cells.merge(matched, on=["slide_id", "cell"], how="left")
    cells["label"] = cells.label.fillna("")
    crops = np.concatenate([slide_crops(root, s)[:] for s in slides])
    masks = np.concatenate([slide_masks(root, s)[:] for s in slides])
    return cells, crops, masks


def mask_features(crops: np.ndarray, masks: np.ndarray, area_um2: np.ndarray) -> np.ndarray:
    """Shape, size and stain of each nucleus from its stored mask.

    Parameters
    ----------
    crops : ndarray, shape (N, S, S, 3), uint8
        Nucleus crops.
    masks : ndarray, shape (N, S, S), bool
        Their nucleus masks.
    area_um2 : ndarray, shape (N,)
        The nuclei's areas from the cell table (the crop shrinks nuclei that do not fit).

    Returns
    -------
    ndarray, shape (N, 7), float64
        log area (um2), eccentricity, solidity, extent, perimeter^2 / (4 pi area) of the
        mask's largest component, and the mean and standard deviation of the hematoxylin
        optical density (``skimage.color.rgb2hed``) over the mask.
    """
    hematoxylin = rgb2hed(crops)[..., 0]
    rows = []
    for one, stain in zip(masks, hematoxylin):
        regions = regionprops(label(one))
        region = max(regions, key=lambda r: r.area)
        stained = stain[one]
        rows.append([region.eccentricity, region.solidity, region.extent,
                     region.perimeter ** 2 / (4 * np.pi * region.area),
                     stained.mean(), stained.std()])
    return np.column_stack([np.log(area_um2), np.asarray(rows)])


def baseline_features(cells: pd.DataFrame, crops: np.ndarray,
                      masks: np.ndarray) -> dict[str, np.ndarray]:
    """Each model-free baseline's features of every cell: ``pixel_pca`` (raw pixels in
    0..1), ``handmade`` (the paper's colour + LBP + HOG), ``hog_dec`` (HOG of the grey
    crop, 9 orientations, 8 px cells, 2x2 blocks, L2-Hys: ``skimage.feature.hog``'s values)
    and ``mask`` (:func:`mask_features`)."""
    return {"pixel_pca": crops.reshape(len(crops), -1).astype(np.float32) / 255.0,
            "handmade": handmade_features(crops),
            "hog_dec": hog_features(grayscale(crops)),
            "mask": mask_features(crops, masks, cells.area.to_numpy())}


def baseline_clusters(name: str, features: np.ndarray, fit: np.ndarray, seed: int) -> np.ndarray:
    """Clusters of every cell, the model fitted on the cells where ``fit`` is True: DEC for
    ``hog_dec``; else k-means after PCA to 50 components (``pixel_pca``, ``d_kmeans``) or
    standardised features (the others)."""
    if name == "hog_dec":
        from wsicell.learning.dec import dec_clusters

        return dec_clusters(features, fit, K, seed)
    first = ([StandardScaler(), PCA(n_components=50, random_state=seed)] if name == "d_kmeans"
             else [PCA(n_components=50, random_state=seed)] if name == "pixel_pca"
             else [StandardScaler()])
    model = make_pipeline(*first, KMeans(K, init="k-means++", n_init=10, random_state=seed))
    return model.fit(features[fit]).predict(features)


def scores(clusters: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Purity, entropy, F-score, NMI, ARI and the largest cluster's share of the cells."""
    paper = clustering_score(clusters, labels)
    sizes = np.bincount(clusters, minlength=K)
    return {"purity": paper.purity, "entropy": paper.entropy, "fscore": paper.fscore,
            "nmi": normalized_mutual_info_score(labels, clusters),
            "ari": adjusted_rand_score(labels, clusters),
            "largest": sizes.max() / sizes.sum(), "sizes": sizes.tolist()}


def model_dir_for(work: Path, config: WsicellConfig, max_iters: int | None,
                  slides: list[str]) -> Path:
    """The directory of the model of these settings and slides (a hash of them)."""
    key = json.dumps([config.train.model_dump(mode="json"), max_iters, sorted(slides)])
    return work / (f"model-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
                   f"-seed{config.train.seed}")


def train_q(store: Path, work: Path, slides: list[str], config: WsicellConfig,
            max_iters: int | None, score_every: int | None, device: str,
            score_model) -> tuple[Path, list[dict]]:
    """Train (or reuse, or resume) the model of ``config`` on ``slides`` in stages of
    ``score_every`` iterations, each resumed from the last checkpoint, calling
    ``score_model(model_dir)`` (a dict) after each stage.

    Returns the model directory and the curve: one ``{"iteration", **scores}`` per stage
    (kept in ``curve.json`` of the model directory, so a reused model keeps its curve).
    """
    from wsicell.pipeline.training import total_iterations, train

    model_dir = model_dir_for(work, config, max_iters, slides)
    curve_file = model_dir / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
    root = open_store(store)
    n_crops = sum(len(slide_cells(root, s, ["cell_id"])) for s in slides)
    stop = total_iterations(config, n_crops, 1)
    stop = min(stop, max_iters) if max_iters else stop
    stages = (list(range(score_every, stop, score_every)) if score_every else []) + [stop]
    meta = model_dir / "config.json"
    started = time.perf_counter()
    for target in stages:
        done = json.loads(meta.read_text())["iterations"] if meta.exists() else 0
        if any(point["iteration"] == target for point in curve) or done > target:
            continue  # scored before (a reused run), or passed by an earlier run unscored
        if done < target:
            train(store, model_dir, config, slides=slides, device=device, max_iters=target,
                  checkpoint_every=score_every or stop, sample_every=score_every or stop,
                  resume=(model_dir / "checkpoint.pt").exists(), workers=0, progress=False)
        curve.append({"iteration": target, **score_model(model_dir)})
        model_dir.mkdir(parents=True, exist_ok=True)
        curve_file.write_text(json.dumps(curve, indent=1))
    print(f"model {model_dir.name}: {stop} iterations "
          f"({time.perf_counter() - started:.0f} s of training and scoring in this run)")
    return model_dir, curve


def print_table(rows: pd.DataFrame) -> None:
    """Per method, split and seed, then the means over seeds."""
    print(rows.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    means = rows.groupby(["split", "method"], sort=False)[list(SCORES)].mean()
    print("\nmeans over seeds")
    print(means.to_string(float_format=lambda v: f"{v:.3f}"))


def summary(rows: pd.DataFrame, split: str) -> dict[str, float]:
    """The closing figures of one split (see the module docstring)."""
    part = rows[rows.split == split]
    q = part[part.method == "Q"]
    means = part[part.method != "Q"].groupby("method")[["purity", "nmi", "ari"]].mean()
    return {"purity_mean": q.purity.mean(), "purity_min": q.purity.min(),
            "nmi_mean": q.nmi.mean(), "ari_mean": q.ari.mean(),
            "largest_cluster_fraction": q.largest.max(),
            "best_baseline_purity": means.purity.max(), "best_baseline_nmi": means.nmi.max(),
            "best_baseline_ari": means.ari.max(), "best_baseline": means.purity.idxmax()}


def parse_value(text: str):
    """A ``--set`` value: JSON when it parses (numbers, booleans), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--sets", nargs="+", choices=["consep", "brca"],
                        default=["consep", "brca"])
    parser.add_argument("--work", type=Path, default=Path("cell_types_bench"))
    parser.add_argument("--points-only", type=Path, default=None, metavar="OUT_DIR",
                        help="only write the types as points CSVs into OUT_DIR/<set>")
    parser.add_argument("--smoke", action="store_true",
                        help="smoke run: " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                      for k, v in SMOKE.items()))
    parser.add_argument("--limit", type=int, default=None,
                        help="use only this many patches of each split (smoke runs)")
    parser.add_argument("--preset", default=None,
                        help="segmentation preset (default: WsicellConfig's segmentation)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=16, help="network width (CPU sizing)")
    parser.add_argument("--max-iters", type=int, default=None,
                        help="stop training after this many iterations")
    parser.add_argument("--score-every", type=int, default=100,
                        help="score Q every this many iterations (the purity curve; 0: only "
                        "the final model)")
    parser.add_argument("--set", dest="options", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="train configuration fields over wsicell train's defaults")
    parser.add_argument("--radius-um", type=float, default=4.0,
                        help="largest distance of a cell to its annotated point")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1, help="ingest processes")
    parser.add_argument("--stain", choices=["image", "source"], default="image",
                        help="one stain fit per patch (image) or per source image the "
                        "patches were cut from (source: ingest.shared_stain)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit, args.max_iters, args.score_every = (SMOKE["limit"], SMOKE["max_iters"],
                                                        SMOKE["score_every"])
        args.seeds, args.options = SMOKE["seeds"], SMOKE["options"] + args.options
    return args


def run_set(cell_set: CellSet, args: argparse.Namespace) -> dict[str, float]:
    """Ingest, train, cluster and score one set; prints its tables, returns its figures."""
    from wsicell.learning.saved_model import load_trained_model

    started = time.perf_counter()
    images = cell_set.images(args.limit)
    split = cell_set.splits(images)
    preset = args.preset or WsicellConfig().segmentation.preset
    suffix = f"-limit{args.limit}" if args.limit else ""
    stain = "-source-stain" if args.stain == "source" else ""
    store = args.work / f"{cell_set.name}-{preset}{stain}{suffix}.zarr"
    sources = [cell_set.source(i) for i in images] if args.stain == "source" else None
    slides, skipped = ingest_patches(images, store, cell_set.mpp, args.workers, args.preset,
                                     sources)
    print(f"\n== {cell_set.name}: {len(slides)} patches ingested ({skipped} refused) in "
          f"{time.perf_counter() - started:.0f} s")
    points = args.work / f"{cell_set.name}-points{suffix}"
    cell_set.write_points(points, images)
    cells, crops, masks = load_cells(store, slides, split, points, args.radius_um / cell_set.mpp)
    fit = (cells.split == "train").to_numpy()
    scored = {s: ((cells.split == s) & (cells.label != "")).to_numpy() for s in ("train", "test")}
    labels = cells.label.to_numpy()
    print(f"cells: {fit.sum()} train, {(~fit).sum()} test; matched: "
          + ", ".join(f"{scored[s].sum()} {s}" for s in scored))
    for s in scored:
        print(f"{s} types: " + ", ".join(f"{t} {n}" for t, n in
                                         cells.label[scored[s]].value_counts().items()))

    train_options = dict(option.split("=", 1) for option in args.options)
    base = WsicellConfig().with_options(
        train={"width": args.width, **{k: parse_value(v) for k, v in train_options.items()}})
    print(f"train: {json.dumps(base.train.model_dump(mode='json'))} max_iters {args.max_iters}")
    train_slides = [s for s in slides if split[s] == "train"]
    features = baseline_features(cells, crops, masks)

    def q_scores(model_dir: Path) -> dict:
        clusters = load_trained_model(model_dir, device=args.device).classify(crops).argmax(1)
        return {f"{s}_{name}": scores(clusters[where], labels[where])[name]
                for s, where in scored.items() for name in ("purity", "nmi", "largest")}

    measured = {"slides": cells.slide_id.to_numpy(), "area_um2": cells.area.to_numpy(),
                "roundness": axis_ratio(*inertia_axes(masks)[:2]),
                "hematoxylin": cells.mean_hematoxylin.to_numpy()}
    matched = (cells.label != "").to_numpy()
    types = sorted(cells.label[matched].unique())
    described = describe_clusters(
        np.searchsorted(types, labels[matched]), k=len(types),
        **{name: values[matched] for name, values in measured.items()})
    print("\nthe annotated types described as clusters would be (matched cells, ranks within "
          "each patch):")
    print(described.set_axis(types).to_string(float_format=lambda v: f"{v:.3f}"))
    rows, curves = [], []
    for seed in args.seeds:
        config = base.with_options(train={"seed": seed})
        model_dir, curve = train_q(store, args.work, train_slides, config, args.max_iters,
                                   args.score_every, args.device, q_scores)
        curves += [{"seed": seed, **point} for point in curve]
        model = load_trained_model(model_dir, device=args.device)
        methods = {"Q": model.classify(crops).argmax(axis=1),
                   "d_kmeans": baseline_clusters("d_kmeans", model.features(crops), fit, seed)}
        methods |= {name: baseline_clusters(name, values, fit, seed)
                    for name, values in features.items()}
        described = describe_clusters(methods["Q"], k=K, **measured)
        print(f"Q's clusters, seed {seed}, all cells:")
        print(described.to_string(float_format=lambda v: f"{v:.3f}"))
        for method, clusters in methods.items():
            for s, where in scored.items():
                rows.append({"method": method, "split": s, "seed": seed,
                             **scores(clusters[where], labels[where])})
    rows = pd.DataFrame(rows)
    curves = pd.DataFrame(curves)
    curves.to_csv(args.work / f"{cell_set.name}-curve.csv", index=False)
    print(f"\n{cell_set.name}: Q against generator iterations (scored after each stage)")
    print(curves.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print_table(rows)
    for s in scored:
        majority = cells.label[scored[s]].value_counts(normalize=True).iloc[0]
        print(f"{cell_set.name}_majority_class_purity_{s}: {majority:.3f}")
    figures = {}
    for s, prefix in (("train", "train_"), ("test", "")):
        figures |= {f"{prefix}{name}": value for name, value in summary(rows, s).items()}
    figures["minutes"] = (time.perf_counter() - started) / 60
    return figures


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    sets = {name: s for name, s in cell_sets(args.data).items() if name in args.sets}
    for cell_set in sets.values():
        if not cell_set.data.is_dir():
            raise SystemExit(f"{cell_set.data}: {cell_set.name} data not found")
    if args.points_only:
        for cell_set in sets.values():
            images = cell_set.images(args.limit)
            cell_set.write_points(args.points_only / cell_set.name, images)
            print(f"{cell_set.name}_points_files: {len(images)}")
        return
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    figures = {name: run_set(cell_set, args) for name, cell_set in sets.items()}
    print()
    for name, values in figures.items():
        for key, value in values.items():
            print(f"{name}_{key}: {value if isinstance(value, str) else f'{value:.3f}'}")
    print(f"minutes: {(time.perf_counter() - started) / 60:.2f}")


if __name__ == "__main__":
    main()
