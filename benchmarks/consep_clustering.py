"""Cell clustering quality on CoNSeP: how pure are Q's clusters with respect to nucleus types?

    .venv/bin/python benchmarks/consep_clustering.py [--work DIR] [--width 32] [--epochs 30]
        [--max-iters N] [--limit N] [--stain-augment 0.0] [--threads N]

    smoke run (32 patches, a few minutes):  --limit 16 --width 16 --max-iters 30 --threads 1

1. Ingest the CoNSeP patches (train + test images, 256x256 at 40x, 0.25 um/px; resampled
   by ingest to the segmentation's 0.4 um/px) into ``WORK/consep.zarr``, one slide per
   patch. Ingest skips slides already complete, so re-runs reuse the store.
2. Train k=5 on all their crops, unsupervised (``WORK/model-...``; a finished model with the
   same settings is reused, an interrupted one resumed).  CPU-sized defaults: width 32
   (the paper: 128), batch 64, 5 critic steps, the paper's optimiser, and 30 epochs instead
   of 10 because the patches give few cells (about 7.5 per patch, ~5k crops in all: 10
   epochs would be only ~150 generator iterations).  30 epochs are ~460 iterations; at the
   ~3-10 s per iteration measured for width 32 on this 2-core machine (1 torch thread,
   shared) that is roughly 25-75 minutes.  Ingest of the 656 patches took ~4.5 s per patch
   here (mostly per-slide overhead), so a cold run needs ~50 minutes more.
3. Match the segmented cells one-to-one to the annotated centroids (``type_mat/*.mat``:
   ``inst_centroid`` x, y; ``inst_type`` 1 miscellaneous, 2 inflammatory, 3 epithelial,
   4 spindle-shaped) within ``--radius-um``, cluster the matched cells with Q's argmax and
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
import time
from pathlib import Path

import numpy as np
import scipy.io
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from wsicell.baseline import baseline_clusters
from wsicell.config import IngestConfig, TrainConfig, WsicellConfig
from wsicell.metrics import clustering_score, match_points
from wsicell.store import complete_slides, open_store, slide_cells, slide_crops
from wsicell.train import load_trained_model, train

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
    """Ingest the patches one by one on one Dask cluster; returns the slide ids and the number
    of patches ingest refused (no tissue, too few stained pixels), each reported.  The thumbnail for tissue
    detection is made fine enough for 64 um patches."""
    from distributed import LocalCluster
    from tqdm import tqdm

    from wsicell.errors import WsicellError
    from wsicell.ingest import ingest

    config = WsicellConfig(ingest=IngestConfig(tissue_mpp=1.0, min_tissue_fraction=0.0)
                           ).with_preset(preset)
    slides, skipped = [], 0
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster:
        for image in tqdm(images, desc="ingest", unit="patch"):
            try:
                slides += ingest([image], store, config, mpp=MPP, progress=False,
                                 scheduler=cluster.scheduler_address)
            except WsicellError as err:  # e.g. no tissue, too few stained pixels
                tqdm.write(f"skipped: {err}")
                skipped += 1
    return slides, skipped


def annotations(data: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Annotated centroids (M, 2) x, y in level-0 pixels and types (M,) 1..4 of one patch."""
    split = slide_id.split("_")[0]
    mat = scipy.io.loadmat(data / "type_mat" / split / f"{slide_id}.mat")
    return mat["inst_centroid"].astype(float), mat["inst_type"].ravel().astype(int)


def matched_cells(store: Path, data: Path, slides: list[str], radius_um: float):
    """Crops (N, 32, 32, 3) uint8 of the cells matched to an annotated nucleus, and its type."""
    root = open_store(store)
    crops, types = [], []
    for slide in slides:
        cells = slide_cells(root, slide)
        centroids, kinds = annotations(data, slide)
        pairs = match_points(cells[["x", "y"]].to_numpy(), centroids, radius_um / MPP)
        if len(pairs):
            crops.append(slide_crops(root, slide)[:][pairs[:, 0]])
            types.append(kinds[pairs[:, 1]])
    return np.concatenate(crops), np.concatenate(types)


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
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--stain-augment", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="paper",
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
    slides, skipped = ingest_patches(patch_images(args.data, args.limit), store, args.workers,
                                     args.preset)
    ingest_s = time.perf_counter() - started
    assert set(slides) <= set(complete_slides(open_store(store)))

    config = WsicellConfig(train=TrainConfig(
        categories=5, width=args.width, epochs=args.epochs, stain_augment=args.stain_augment,
        seed=args.seed))
    name = (f"model-w{args.width}-e{args.epochs:g}-s{args.stain_augment:g}-seed{args.seed}"
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

    crops, types = matched_cells(store, args.data, slides, args.radius_um)
    clusters = model.classify(crops).argmax(axis=1)
    score = clustering_score(clusters, types)
    baseline = clustering_score(pixel_kmeans(crops, model.k, args.seed), types)
    handmade = clustering_score(baseline_clusters(crops, model.k, args.seed), types)
    majority = np.bincount(types).max() / len(types)

    print(f"preset: {args.preset}")
    print(f"patches: {len(slides)}")
    print(f"patches_skipped: {skipped}")
    print(f"ingest_seconds: {ingest_s:.0f}")
    print(f"train_seconds: {train_s:.0f}")
    print(f"model_dir: {model_dir}")
    print(f"iterations: {json.loads((model_dir / 'config.json').read_text())['iterations']}")
    print(f"matched_cells: {len(types)}")
    for kind, label in TYPES.items():
        print(f"cells_{label}: {int((types == kind).sum())}")
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
