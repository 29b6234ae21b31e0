"""Trainer throughput: generator iterations per second and crops per second from disk.

    .venv/bin/python benchmarks/bench_train.py [--store STORE.zarr] [--device auto]
        [--width 32] [--iters 3] [--workers 2] [--threads N]

Without ``--store`` the vendored bone-marrow image is ingested into a temporary store.
``loader_crops_per_s`` streams uint8 batches through :class:`wsicell.learning.data.CropStream` and a
DataLoader (``--workers`` processes, pinned memory on a GPU) and copies them to the device;
``gen_iters_per_s`` times full iterations (5 critic steps with gradient penalty, one G step,
one Q step, batch 64) on batches from that loader.  On a GPU it also compares bf16 autocast
on/off and ``torch.compile`` on/off on the same card.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from wsicell.config import IngestConfig, TrainConfig, WsicellConfig
from wsicell.io.store import complete_slides, open_store
from wsicell.learning.augment import prepare_batch
from wsicell.learning.data import CropStream, crop_loader
from wsicell.learning.device import resolve_device
from wsicell.learning.model import build_model
from wsicell.learning.trainer import Trainer

VENDORED = Path(__file__).resolve().parents[1] / "tests" / "data" / "BM_GRAZ_HE_0001_01.png"


def vendored_store(directory: Path) -> Path:
    """Ingest the vendored image (small chunks, so that the loader reads several)."""
    from wsicell.pipeline.ingest import ingest

    store = directory / "bench.zarr"
    config = WsicellConfig(ingest=IngestConfig(tile_size=512, crops_per_chunk=128))
    ingest(store, [VENDORED], config, mpp=0.4, workers=1, progress=False)
    return store


def loader_rate(store: Path, slides: list[str], device: torch.device, workers: int,
                batches: int) -> float:
    """Crops per second from disk to the device (after one warm-up batch)."""
    stream = CropStream(store, slides, 64, 4096, seed=0, num_workers=workers)
    pin = device.type == "cuda"
    loader = iter(crop_loader(stream, workers, pin))
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader).to(device, non_blocking=pin)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del batch
    return batches * 64 / (time.perf_counter() - start)


def iteration_rate(store: Path, slides: list[str], device: torch.device, width: int,
                   iters: int, workers: int, amp: bool, compile: bool) -> float:
    """Generator iterations per second (after two warm-up iterations)."""
    config = WsicellConfig(train=TrainConfig(width=width, amp=amp))
    cfg = config.train
    model = build_model(cfg.categories, cfg.noise_dim, cfg.width, cfg.seed).to(device)
    trainer = Trainer(model, config, device, compile=compile)
    stream = CropStream(store, slides, cfg.batch_size, cfg.shuffle_buffer, cfg.seed,
                        num_workers=workers)
    pin = device.type == "cuda"
    batches = (prepare_batch(b.to(device, non_blocking=pin), trainer.generator, True)
               for b in crop_loader(stream, workers, pin))
    for _ in range(2):
        trainer.iteration(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        losses = trainer.iteration(batches)
    losses.cpu()
    return iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path,
                        help="cell store [default: ingest the vendored image]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--width", type=int, default=None,
                        help="network width [default: 128 on a GPU, 32 on the CPU]")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed iterations [default: 50 on a GPU, 3 on the CPU]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    width = args.width or (128 if gpu else 32)
    iters = args.iters or (50 if gpu else 3)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or vendored_store(Path(tmp))
        slides = complete_slides(open_store(store))
        n_crops = CropStream(store, slides, 64, 4096, 0).n_crops
        print(f"device: {torch.cuda.get_device_name(device) if gpu else 'cpu'}")
        print(f"store_crops: {n_crops}")
        print(f"torch_threads: {torch.get_num_threads()}")
        print(f"width: {width}")
        loader = loader_rate(store, slides, device, args.workers, args.loader_batches)
        # on a GPU each variant is printed as soon as it is measured (a failing compile
        # loses nothing); the headline is the default: float32 (TF32 convolutions), eager
        variants = {"default": (False, False), "amp": (True, False), "compile": (False, True),
                    "amp_compile": (True, True)} if gpu else {"cpu": (False, False)}
        rates = {}
        for name, (amp, compile) in variants.items():
            rates[name] = iteration_rate(store, slides, device, width, iters, args.workers,
                                         amp, compile)
            if gpu:
                print(f"gen_iters_per_s_{name}: {rates[name]:.3f}", flush=True)
        print(f"gen_iters_per_s: {next(iter(rates.values())):.3f}")
        print(f"loader_crops_per_s: {loader:.0f}")


if __name__ == "__main__":
    main()
