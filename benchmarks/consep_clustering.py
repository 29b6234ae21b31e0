"""Cell clustering quality on CoNSeP: how pure are Q's clusters with respect to nucleus types?

    .venv/bin/python benchmarks/consep_clustering.py [--work DIR] [--preset tissue]
        [--width 16] [--max-iters 1500] [--lr-info 1e-3] [--stain-augment 0.0] [--threads 2]

    smoke run (32 patches, a few minutes):  --limit 16 --width 16 --max-iters 30 --threads 1

1. Ingest the CoNSeP patches (train + test images, 256x256 at 40x, 0.25 um/px; resampled
   by ingest to the segmentation's 0.4 um/px) into ``WORK/consep.zarr``, one slide per
   patch, with the ``tissue`` segmentation preset (the paper's recipe, tuned for bone
   marrow, finds only ~14% of these colorectal nuclei; README, "Detection").  Ingest skips
   slides already complete, so re-runs reuse the store.  About 5 minutes here.
2. Train k=5 on all their crops, unsupervised (``WORK/model-...``; a finished model with the
   same settings is reused, an interrupted one resumed).  CPU-sized settings: width 16
   (the paper: 128), the paper's batch 64, 5 critic steps and optimiser, except the Q
   step's learning rate (``--lr-info`` 1e-3: with the paper's 1e-4, L_Q stays at ln 5 and
   G ignores its code for the whole of a CPU-length run), and ``--max-iters`` instead of
   epochs.  About 1.2 s per iteration with 2 threads on this 2-core machine.
3. Match the segmented cells one-to-one to the annotated centroids (``type_mat/*.mat``:
   ``inst_centroid`` x, y; ``inst_type`` 1 miscellaneous, 2 inflammatory, 3 epithelial,
   4 spindle-shaped; written as points CSVs) within ``--radius-um`` by
   ``wsicell.analysis.evaluation.matched_cells``, cluster the matched cells with Q's argmax and
   score purity / entropy / F-score against the types (method section 4).  The final model
   is scored; no checkpoint is chosen by these labels.
4. Baselines on the same crops: k-means (k=5) on a 50-component PCA of the raw pixels
   (``baseline_*``), and the paper's hand-made features + k-means (``handmade_*``).

Data: S. Graham et al., "HoVer-Net", Medical Image Analysis 2019 (CoNSeP), 256x256 cut.
Ends with ``name: value`` lines: purity, entropy, fscore, baseline_purity.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from wsicell.analysis.evaluation import matched_cells
from wsicell.analysis.metrics import clustering_score
from wsicell.config import IngestConfig, TrainConfig, WsicellConfig
from wsicell.io.store import complete_slides, open_store
from wsicell.learning.baseline import baseline_clusters
from wsicell.learning.saved_model import load_trained_model
from wsicell.pipeline.training import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "consep_patches"
MPP = 0.25  # the patches are 40x
TYPES = {1: "miscellaneous", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}


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
                   preset: str) -> tuple[list[str], int]:
    """Ingest the patches (one slide each); returns the ids of the ingested slides and the
    number of patches ingest refused (no tissue, too few stained pixels), each reported.
    The thumbnail for tissue detection is made fine enough for 64 um patches."""
    from wsicell.errors import WsicellError
    from wsicell.pipeline.ingest import ingest
    from wsicell.pipeline.tiles import slide_id_for

    config = WsicellConfig(ingest=IngestConfig(tissue_mpp=1.0, min_tissue_fraction=0.0)
                           ).with_options(preset)
    try:
        ingest(store, images, config, mpp=MPP, workers=workers)
    except WsicellError as err:  # the refused patches, each warned about
        print(err)
    complete = set(complete_slides(open_store(store)))
    slides = [slide_id_for(image) for image in images if slide_id_for(image) in complete]
    return slides, len(images) - len(slides)


def annotations(data: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Annotated centroids (M, 2) x, y in level-0 pixels and types (M,) 1..4 of one patch."""
    split = slide_id.split("_")[0]
    mat = scipy.io.loadmat(data / "type_mat" / split / f"{slide_id}.mat")
    return mat["inst_centroid"].astype(float), mat["inst_type"].ravel().astype(int)


def write_points(data: Path, out: Path, images: list[Path]) -> None:
    """One ``<patch>.csv`` (``x,y,label``: annotated centroid in level-0 pixels and type name)
    per patch in a fresh ``out``, named like the slide ids ingest gives the patches."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for image in images:
        centroids, kinds = annotations(data, image.stem)
        centroids = centroids.reshape(-1, 2)
        pd.DataFrame({"x": centroids[:, 0], "y": centroids[:, 1],
                      "label": [TYPES[k] for k in kinds]}).to_csv(out / f"{image.stem}.csv",
                                                                   index=False)


def pixel_kmeans(crops: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Baseline clusters: k-means on a 50-component PCA of the raw pixels."""
    pixels = crops.reshape(len(crops), -1).astype(np.float32) / 255.0
    projected = PCA(n_components=min(50, len(crops) - 1), random_state=seed).fit_transform(pixels)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(projected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=Path("consep_bench"))
    parser.add_argument("--limit", type=int, default=None,
                        help="use only this many patches of each split (smoke runs)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--max-iters", type=int, default=1500)
    parser.add_argument("--stain-augment", type=float, default=0.0)
    parser.add_argument("--lr-info", type=float, default=1e-3,
                        help="learning rate of the Q step (the paper's 1e-4 is too slow for a "
                        "CPU-length run)")
    parser.add_argument("--lambda-cluster", type=float, default=0.0,
                        help="weight of the real-crop clustering term of the Q step (0 = paper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tissue",
                        help="segmentation preset of the ingest (a new --work per preset)")
    parser.add_argument("--radius-um", type=float, default=4.0,
                        help="largest distance of a cell to its annotated centroid")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="ingest and loader processes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: CoNSeP patches not found")

    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "consep.zarr"
    started = time.perf_counter()
    images = patch_images(args.data, args.limit)
    slides, skipped = ingest_patches(images, store, args.workers, args.preset)
    ingest_s = time.perf_counter() - started

    config = WsicellConfig(train=TrainConfig(
        categories=5, width=args.width, epochs=args.epochs, stain_augment=args.stain_augment,
        lr_info=args.lr_info, lambda_cluster=args.lambda_cluster, seed=args.seed))
    name = (f"model-w{args.width}-e{args.epochs:g}-s{args.stain_augment:g}-q{args.lr_info:g}"
            f"-c{args.lambda_cluster:g}-seed{args.seed}"
            f"-n{len(slides)}" + (f"-it{args.max_iters}" if args.max_iters else ""))
    model_dir = args.work / name
    started = time.perf_counter()
    if not (model_dir / "config.json").exists():
        train(store, model_dir, config, slides=slides, device=args.device,
              max_iters=args.max_iters, checkpoint_every=200, sample_every=200,
              resume=(model_dir / "checkpoint.pt").exists(),
              workers=min(args.workers, 1), progress=True)
    train_s = time.perf_counter() - started
    model = load_trained_model(model_dir, device=args.device)

    write_points(args.data, model_dir / "points", images)
    with warnings.catch_warnings():  # the patches ingest refused have no slide
        warnings.simplefilter("ignore")
        crops, types, _ = matched_cells(store, model_dir / "points", args.radius_um / MPP)
    clusters = model.classify(crops).argmax(axis=1)
    score = clustering_score(clusters, types)
    baseline = clustering_score(pixel_kmeans(crops, model.k, args.seed), types)
    handmade = clustering_score(baseline_clusters(crops, model.k, args.seed), types)
    majority = max((types == label).mean() for label in TYPES.values())

    print(f"preset: {args.preset}")
    print(f"patches: {len(slides)}")
    print(f"patches_skipped: {skipped}")
    print(f"ingest_seconds: {ingest_s:.0f}")
    print(f"train_seconds: {train_s:.0f}")
    print(f"model_dir: {model_dir}")
    print(f"iterations: {json.loads((model_dir / 'config.json').read_text())['iterations']}")
    print(f"matched_cells: {len(types)}")
    for label in TYPES.values():
        print(f"cells_{label}: {int((types == label).sum())}")
    print(f"clusters_used: {len(np.unique(clusters))}")
    print(f"majority_purity: {majority:.3f}")
    print(f"handmade_baseline_purity: {handmade.purity:.3f}")
    print(f"baseline_entropy: {baseline.entropy:.3f}")
    print(f"baseline_fscore: {baseline.fscore:.3f}")
    print(f"purity: {score.purity:.3f}")
    print(f"entropy: {score.entropy:.3f}")
    print(f"fscore: {score.fscore:.3f}")
    print(f"baseline_purity: {baseline.purity:.3f}")


if __name__ == "__main__":
    main()
