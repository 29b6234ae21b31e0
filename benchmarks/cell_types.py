"""Cell types on CoNSeP: do Q's clusters beat k-means baselines, across seeds?

    .venv/bin/python benchmarks/cell_types.py [--work DIR] [--preset NAME] [--seeds 0 1 2]
        [--width 16] [--set FIELD=VALUE ...] [--max-iters N] [--threads 1]

    smoke run (24 + 24 patches, about a minute):  --limit 24 --max-iters 5 --seeds 0
        --set batch_size=16   (the default segmentation finds ~4 cells per patch)

1. Ingest the CoNSeP patches (train + test, 256x256 at 40x, 0.25 um/px; resampled by ingest
   to the segmentation's 0.4 um/px) into ``WORK/consep-<preset>.zarr``, one slide per patch,
   with the default segmentation of ``WsicellConfig()`` unless ``--preset`` names another.
   Ingest skips slides already complete, so re-runs reuse the store.
2. Per seed, train k=5 on the **train** patches' cells only, unsupervised, with the defaults
   of ``wsicell train`` except the CPU sizing (``--width``) and any ``--set`` field of the
   ``train`` configuration, e.g. ``--set epochs=60`` (``WORK/model-<hash>-seed<N>``; a finished
   model with the same settings is reused, an interrupted one resumed).  The final model is
   scored; no checkpoint or setting is chosen by the test labels.
3. Match cells one-to-one to the annotated centroids (``type_mat/*.mat``: ``inst_centroid``
   x, y; ``inst_type`` 1 miscellaneous, 2 inflammatory, 3 epithelial, 4 spindle-shaped)
   within ``--radius-um`` (``wsicell.analysis.evaluation.matched_rows``).
4. Baselines, each with the same seeds and k, **fitted on all the train patches' cells**
   (as Q is; no labels) and applied to every cell: k-means on a 50-component PCA of the
   pixels (``pixel_pca``), the paper's hand-made features + k-means (``handmade``,
   ``wsicell.learning.baseline``), and k-means on standardised mask shape / size / stain
   features (``mask``, :func:`mask_features`, from the nucleus masks the store keeps).
5. Score every method on the matched cells of the train patches (``train_*``: the figures to
   choose settings by) and of the test patches (the figures to report): purity, entropy,
   F-score (``wsicell.analysis.metrics.clustering_score``, method section 4), NMI, ARI
   (scikit-learn) and the cluster sizes, per seed and as means.

Ends with ``name: value`` lines (test cells; the same with a ``train_`` prefix for the train
cells): ``purity_mean``, ``purity_min``, ``nmi_mean``, ``ari_mean`` of Q,
``largest_cluster_fraction`` (Q's largest cluster over the scored cells, the **max** over
seeds), ``best_baseline_purity`` / ``_nmi`` / ``_ari`` (the best baseline's mean over seeds,
each figure's best).  ``--points-only`` writes the types as points CSVs, for
``wsicell evaluate clustering --points OUT_DIR --radius 16`` (4 um at 0.25 um/px):

    .venv/bin/python benchmarks/cell_types.py --points-only OUT_DIR

Data: S. Graham et al., "HoVer-Net", Medical Image Analysis 2019 (CoNSeP), 256x256 cut.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
import warnings
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
from wsicell.learning.baseline import handmade_features

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "consep_patches"
MPP = 0.25  # the patches are 40x
K = 5
TYPES = {1: "miscellaneous", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
SCORES = ("purity", "entropy", "fscore", "nmi", "ari", "largest")


def patch_images(data: Path, limit: int | None) -> list[Path]:
    """Train and test images (``limit`` of each split, spread over the split, when given)."""
    images = []
    for split in ("train", "test"):
        files = sorted((data / "images" / split).glob("*.jpg"))
        if limit:
            files = files[:: max(1, len(files) // limit)][:limit]
        images += files
    return images


def ingest_patches(images: list[Path], store: Path, workers: int,
                   preset: str | None) -> tuple[list[str], int]:
    """Ingest the patches (one slide each); returns the ids of the ingested slides and the
    number of patches ingest refused (no tissue, too few stained pixels), each reported.
    The thumbnail for tissue detection is made fine enough for 64 um patches."""
    from wsicell.errors import WsicellError
    from wsicell.pipeline.ingest import ingest
    from wsicell.pipeline.tiles import slide_id_for

    config = WsicellConfig(ingest=IngestConfig(tissue_mpp=1.0, min_tissue_fraction=0.0)
                           ).with_options(preset)
    try:
        with warnings.catch_warnings():  # one warning per refused patch; the error counts them
            warnings.simplefilter("ignore")
            ingest(store, images, config, mpp=MPP, workers=workers, progress=False)
    except WsicellError as err:
        print(err)
    complete = set(complete_slides(open_store(store)))
    slides = [slide_id_for(image) for image in images if slide_id_for(image) in complete]
    return slides, len(images) - len(slides)


def annotations(data: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Annotated centroids (M, 2) x, y in level-0 pixels and types (M,) 1..4 of one patch."""
    split = slide_id.split("_")[0]
    mat = scipy.io.loadmat(data / "type_mat" / split / f"{slide_id}.mat")
    return mat["inst_centroid"].astype(float).reshape(-1, 2), mat["inst_type"].ravel().astype(int)


def write_points(data: Path, out: Path, images: list[Path]) -> None:
    """One ``<patch>.csv`` (``x,y,label``: annotated centroid in level-0 pixels and type name)
    per patch in a fresh ``out``, named like the slide ids ingest gives the patches."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for image in images:
        centroids, kinds = annotations(data, image.stem)
        pd.DataFrame({"x": centroids[:, 0], "y": centroids[:, 1],
                      "label": [TYPES[k] for k in kinds]}).to_csv(out / f"{image.stem}.csv",
                                                                   index=False)


def load_cells(store: Path, slides: list[str], points: Path,
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
    cells["split"] = cells.slide_id.str.split("_").str[0]
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
    """Each baseline's features of every cell: ``pixel_pca`` (raw pixels in 0..1),
    ``handmade`` (the paper's colour + LBP + HOG) and ``mask`` (:func:`mask_features`)."""
    return {"pixel_pca": crops.reshape(len(crops), -1).astype(np.float32) / 255.0,
            "handmade": handmade_features(crops),
            "mask": mask_features(crops, masks, cells.area.to_numpy())}


def baseline_clusters(name: str, features: np.ndarray, fit: np.ndarray, seed: int) -> np.ndarray:
    """k-means clusters of every cell, the model fitted on the cells where ``fit`` is True:
    PCA to 50 components first for ``pixel_pca``, standardised features for the others."""
    first = (PCA(n_components=50, random_state=seed) if name == "pixel_pca"
             else StandardScaler())
    model = make_pipeline(first, KMeans(K, init="k-means++", n_init=10, random_state=seed))
    return model.fit(features[fit]).predict(features)


def train_q(store: Path, work: Path, slides: list[str], config: WsicellConfig,
            max_iters: int | None, device: str) -> Path:
    """Train (or reuse, or resume) the model of ``config`` on ``slides``; its directory."""
    from wsicell.pipeline.training import train

    key = json.dumps([config.train.model_dump(mode="json"), max_iters, sorted(slides)])
    model_dir = work / (f"model-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
                        f"-seed{config.train.seed}")
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        train(store, model_dir, config, slides=slides, device=device, max_iters=max_iters,
              checkpoint_every=100, sample_every=100,
              resume=(model_dir / "checkpoint.pt").exists(), workers=0, progress=False)
        print(f"trained {model_dir.name} in {time.perf_counter() - started:.0f} s")
    iterations = json.loads((model_dir / "config.json").read_text())["iterations"]
    print(f"model {model_dir.name}: {iterations} iterations")
    return model_dir


def q_clusters(model_dir: Path, crops: np.ndarray, device: str) -> np.ndarray:
    """Q's argmax of every crop."""
    from wsicell.learning.saved_model import load_trained_model

    return load_trained_model(model_dir, device=device).classify(crops).argmax(axis=1)


def scores(clusters: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Purity, entropy, F-score, NMI, ARI and the largest cluster's share of the cells."""
    paper = clustering_score(clusters, labels)
    sizes = np.bincount(clusters, minlength=K)
    return {"purity": paper.purity, "entropy": paper.entropy, "fscore": paper.fscore,
            "nmi": normalized_mutual_info_score(labels, clusters),
            "ari": adjusted_rand_score(labels, clusters),
            "largest": sizes.max() / sizes.sum(), "sizes": sizes.tolist()}


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


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=Path("cell_types_bench"))
    parser.add_argument("--points-only", type=Path, default=None, metavar="OUT_DIR",
                        help="only write the types as points CSVs into OUT_DIR")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only this many patches of each split (smoke runs)")
    parser.add_argument("--preset", default=None,
                        help="segmentation preset (default: WsicellConfig's segmentation)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=16, help="network width (CPU sizing)")
    parser.add_argument("--max-iters", type=int, default=None,
                        help="stop training after this many iterations (smoke runs)")
    parser.add_argument("--set", dest="options", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="train configuration fields over wsicell train's defaults")
    parser.add_argument("--radius-um", type=float, default=4.0,
                        help="largest distance of a cell to its annotated centroid")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1, help="ingest processes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: CoNSeP patches not found")
    images = patch_images(args.data, args.limit)
    if args.points_only:
        write_points(args.data, args.points_only, images)
        print(f"points_files: {len(images)}")
        return
    import torch

    torch.set_num_threads(args.threads)
    preset = args.preset or WsicellConfig().segmentation.preset
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / f"consep-{preset}{f'-limit{args.limit}' if args.limit else ''}.zarr"
    started = time.perf_counter()
    slides, skipped = ingest_patches(images, store, args.workers, args.preset)
    print(f"ingest: {len(slides)} patches ({skipped} refused) in "
          f"{time.perf_counter() - started:.0f} s")
    points = args.work / f"points{f'-limit{args.limit}' if args.limit else ''}"
    write_points(args.data, points, images)
    cells, crops, masks = load_cells(store, slides, points, args.radius_um / MPP)
    fit = (cells.split == "train").to_numpy()
    scored = {split: ((cells.split == split) & (cells.label != "")).to_numpy()
              for split in ("train", "test")}
    print(f"cells: {fit.sum()} train, {(~fit).sum()} test; matched: "
          + ", ".join(f"{scored[s].sum()} {s}" for s in scored))
    print("test types: " + ", ".join(f"{t} {n}" for t, n in
                                      cells.label[scored["test"]].value_counts().items()))

    train_options = dict(option.split("=", 1) for option in args.options)
    base = WsicellConfig().with_options(
        train={"width": args.width, **{k: parse_value(v) for k, v in train_options.items()}})
    print(f"train: {json.dumps(base.train.model_dump(mode='json'))} max_iters {args.max_iters}")
    train_slides = [s for s in slides if s.startswith("train")]
    features = baseline_features(cells, crops, masks)
    rows = []
    for seed in args.seeds:
        config = base.with_options(train={"seed": seed})
        model_dir = train_q(store, args.work, train_slides, config, args.max_iters, args.device)
        methods = {"Q": q_clusters(model_dir, crops, args.device)}
        methods |= {name: baseline_clusters(name, values, fit, seed)
                    for name, values in features.items()}
        for method, clusters in methods.items():
            for split, where in scored.items():
                rows.append({"method": method, "split": split, "seed": seed,
                             **scores(clusters[where], cells.label.to_numpy()[where])})
    rows = pd.DataFrame(rows)
    majority = cells.label[scored["test"]].value_counts(normalize=True).iloc[0]
    print_table(rows)
    print(f"\nmajority_class_purity_test: {majority:.3f}")
    for split, prefix in (("train", "train_"), ("test", "")):
        for name, value in summary(rows, split).items():
            print(f"{prefix}{name}: {value if isinstance(value, str) else f'{value:.3f}'}")


if __name__ == "__main__":
    main()
