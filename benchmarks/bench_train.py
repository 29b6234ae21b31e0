"""Trainer throughput: generator iterations per second, the same against nu_gan's own training
loop, and crops per second from disk.

    .venv/bin/python benchmarks/bench_train.py [--store STORE.zarr] [--device auto]
        [--width 32] [--iters 3] [--workers 2] [--threads N] [--block N] [--warmup 2]
        [--widths 16 128]

Without ``--store`` the vendored bone-marrow image is ingested into a temporary store.
``loader_crops_per_s`` streams uint8 batches through :class:`wsicell.learning.data.CropStream` and a
DataLoader (``--workers`` processes, pinned memory on a GPU) and copies them to the device;
``loader_crops_per_s_s3`` does the same from a store copied to an S3 server on loopback
(moto's server mode, started by the benchmark; ``pip install 'wsicell[test]'``): ``--store``,
or else ``--s3-copies`` copies of the vendored image at the default chunking, in rounds
alternating with that store on the local disk, whose rate in those rounds it prints beside
(``loader_crops_per_s_local_same_rounds``, ratio ``loader_s3_vs_local``);
``gen_iters_per_s`` times full iterations of the default configuration (5 critic steps with
gradient penalty, one G step, one Q step, batch 64) on batches from that loader.

``nu_gan_iters_per_s`` times one iteration of the research code's ``train_representation``
(Hu et al. 2018, github.com/bohu615/nu_gan; ported to current torch in
``nu_gan_reference.py``) at the same width, batch 64, device and threads, on batches of the
same loader, in the same run: after ``--warmup`` untimed iterations of each, the two are timed
in alternating blocks of ``--block`` iterations (the side that goes first rotates), so that
drift of the machine's load affects both.  ``speedup_vs_nu_gan`` is ``gen_iters_per_s``
divided by ``nu_gan_iters_per_s``.  On a GPU it also compares bf16 autocast on/off and
``torch.compile`` on/off on the same card (``gen_iters_per_s_default`` is the paired run).

On the CPU the default iteration is bf16 autocast (on a CPU with native bfloat16) with
channels-last networks and batches; a third side in the same alternating blocks runs it in
float32 with the default memory layout (``gen_iters_per_s_float32``, what wsicell ran before),
and ``cpu_speedup_vs_float32`` is the ratio of the two at ``--width`` (32).  Then the default
iteration is timed alone at the ``--widths`` (16 and 128: ``gen_iters_per_s_w16``,
``gen_iters_per_s_w128``; one warm-up and one timed iteration at 128).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from wsicell.config import IngestConfig, TrainConfig, WsicellConfig
from wsicell.io.store import complete_slides, open_store
from wsicell.learning.augment import prepare_batch
from wsicell.learning.data import CropStream, crop_loader
from wsicell.learning.device import cpu_supports_bfloat16, resolve_device
from wsicell.learning.model import model_for
from wsicell.learning.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nu_gan_reference import NuGanReference  # noqa: E402  (benchmark-only, next to this file)

VENDORED = Path(__file__).resolve().parents[1] / "tests" / "data" / "BM_GRAZ_HE_0001_01.png"


def vendored_store(directory: Path) -> Path:
    """Ingest the vendored image (small chunks, so that the loader reads several)."""
    from wsicell.pipeline.ingest import ingest

    store = directory / "bench.zarr"
    config = WsicellConfig(ingest=IngestConfig(tile_size=512, crops_per_chunk=128))
    ingest(store, [VENDORED], config, mpp=0.4, workers=1, progress=False)
    return store


def cohort_store(directory: Path, copies: int) -> Path:
    """``copies`` copies of the vendored image ingested as slides of one store at the default
    chunking (one chunk of ~560 crops per slide): a store whose loader reads whole chunks,
    as it does from a cohort on object storage."""
    from wsicell.pipeline.ingest import ingest

    images = directory / "cohort"
    images.mkdir()
    for copy in range(copies):
        shutil.copyfile(VENDORED, images / f"slide_{copy:02d}.png")
    store = directory / "cohort.zarr"
    ingest(store, sorted(images.iterdir()), WsicellConfig(ingest=IngestConfig(tile_size=512)),
           mpp=0.4, workers=1, progress=False)
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


def loader_rate_s3(store: Path, slides: list[str], device: torch.device, workers: int,
                   batches: int, rounds: int = 3) -> tuple[float, float]:
    """Crops per second from the store copied to an S3 server on loopback (moto's server
    mode, started here), and the same from the local store, measured in alternating rounds
    (the median of each): ``(s3, local)``."""
    import os
    import socket
    import subprocess

    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        deadline = time.monotonic() + 120  # moto's imports take tens of seconds on a busy box
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench_train: the moto S3 server did not start") from None
                time.sleep(0.1)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached instance may name an old server
        fs = s3fs.S3FileSystem()
        fs.mkdir("wsicell-bench")
        fs.put(str(store), "wsicell-bench/bench.zarr", recursive=True)
        rates = {"s3": [], "local": []}
        for round_ in range(rounds):
            for name in (["s3", "local"] if round_ % 2 == 0 else ["local", "s3"]):
                where = "s3://wsicell-bench/bench.zarr" if name == "s3" else store
                rates[name].append(loader_rate(where, slides, device, workers, batches))
        return tuple(sorted(rates[name])[len(rates[name]) // 2] for name in ("s3", "local"))
    finally:
        server.terminate()
        server.wait()


def wsicell_trainer(store: Path, slides: list[str], device: torch.device, width: int,
                    workers: int, amp: bool | None, compile: bool,
                    channels_last: bool | None = None):
    """A fresh :class:`Trainer` (default configuration at ``width``; ``amp`` None = auto,
    ``channels_last`` None = on a CPU) and an endless iterator of prepared (augmented,
    float, on the device) batches from the store's loader."""
    config = WsicellConfig(train=TrainConfig(width=width, amp=amp))
    cfg = config.train
    model = model_for(cfg).to(device)
    trainer = Trainer(model, config, device, compile=compile, channels_last=channels_last)
    stream = CropStream(store, slides, cfg.batch_size, cfg.shuffle_buffer, cfg.seed,
                        num_workers=workers)
    pin = device.type == "cuda"
    batches = (prepare_batch(b.to(device, non_blocking=pin), trainer.generator, True,
                             cfg.stain_augment, cfg.nucleus_px, cfg.size_channel)
               for b in crop_loader(stream, workers, pin))
    return trainer, batches


def timed(iteration, batches, iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` calls of ``iteration(batches)``, the device synchronised."""
    start = time.perf_counter()
    for _ in range(iters):
        losses = iteration(batches)
    losses.cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def iteration_rate(store: Path, slides: list[str], device: torch.device, width: int,
                   iters: int, workers: int, amp: bool | None, compile: bool,
                   warmup: int = 2) -> float:
    """Generator iterations per second (after ``warmup`` iterations)."""
    trainer, batches = wsicell_trainer(store, slides, device, width, workers, amp, compile)
    timed(trainer.iteration, batches, warmup, device)
    return iters / timed(trainer.iteration, batches, iters, device)


def paired_rates(store: Path, slides: list[str], device: torch.device, width: int,
                 iters: int, workers: int, block: int, warmup: int) -> dict[str, float]:
    """Iterations per second of wsicell's default iteration, of nu_gan's
    (:mod:`nu_gan_reference`, same width, batch 64, same device and threads) and, on a CPU,
    of wsicell in float32 with the default memory layout (what it ran before bf16 autocast
    and channels-last): timed in alternating blocks of ``block`` iterations (the order of
    the sides rotates from block to block) on batches of the same loader, after ``warmup``
    iterations of each.  Keys ``wsicell``, ``nu_gan`` and on a CPU ``float32``."""
    trainer, batches = wsicell_trainer(store, slides, device, width, workers, None, False)
    reference = NuGanReference(width=width, rand=trainer.cfg.noise_dim,
                               dis_category=trainer.cfg.categories,
                               batch_size=trainer.cfg.batch_size, device=device,
                               seed=trainer.cfg.seed)
    # nu_gan's networks take the RGB channels (the paper's); wsicell's default adds the size
    sides = {"wsicell": trainer.iteration,
             "nu_gan": lambda stream: reference.iteration(b[:, :3] for b in stream)}
    if device.type == "cpu":
        float32, _ = wsicell_trainer(store, slides, device, width, workers, False, False,
                                     channels_last=False)
        sides["float32"] = float32.iteration
    for iteration in sides.values():
        timed(iteration, batches, warmup, device)
    seconds = dict.fromkeys(sides, 0.0)
    done = 0
    while done < iters:
        n = min(block, iters - done)
        turn = (done // block) % len(sides)
        names = list(sides)[turn:] + list(sides)[:turn]
        for name in names:
            seconds[name] += timed(sides[name], batches, n, device)
        done += n
    return {name: iters / s for name, s in seconds.items()}


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
    parser.add_argument("--block", type=int, default=None,
                        help="iterations per alternating timing block of wsicell and nu_gan "
                        "[default: 10 on a GPU, 1 on the CPU]")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed iterations of each before the comparison")
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--s3-copies", type=int, default=16,
                        help="without --store, the S3 loader comparison reads a store of this "
                        "many copies of the vendored image at the default chunking")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--widths", type=int, nargs="*", default=None,
                        help="on the CPU, also time the default iteration at these widths "
                        "(gen_iters_per_s_wN) [default: 16 128]")
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
        rates = paired_rates(store, slides, device, width, iters, args.workers,
                             args.block or (10 if gpu else 1), args.warmup)
        rate, reference = rates["wsicell"], rates["nu_gan"]
        print(f"nu_gan_iters_per_s: {reference:.4g}", flush=True)
        if not gpu:
            # the CPU default (bf16 autocast where the CPU has it, channels-last) against
            # float32 in the default layout, interleaved in the same run
            print(f"precision: {'bfloat16' if cpu_supports_bfloat16() else 'float32'}")
            print(f"gen_iters_per_s_float32: {rates['float32']:.4g}")
            print(f"gen_iters_per_s_w{width}: {rate:.4g}")
            print(f"cpu_speedup_vs_float32: {rate / rates['float32']:.3f}", flush=True)
            for other in (16, 128) if args.widths is None else args.widths:
                slow = other > 64  # one timed iteration of a wide network is long enough
                other_rate = iteration_rate(store, slides, device, other, 1 if slow else iters,
                                            args.workers, None, False, 1 if slow else 2)
                print(f"gen_iters_per_s_w{other}: {other_rate:.4g}", flush=True)
        # on a GPU each variant is printed as soon as it is measured (a failing compile
        # loses nothing); the headline is the default: float32 (TF32 convolutions), eager
        if gpu:
            print(f"gen_iters_per_s_default: {rate:.3f}", flush=True)
            variants = {"amp": (True, False), "compile": (False, True),
                        "amp_compile": (True, True)}
            for name, (amp, compile) in variants.items():
                other = iteration_rate(store, slides, device, width, iters, args.workers,
                                       amp, compile)
                print(f"gen_iters_per_s_{name}: {other:.3f}", flush=True)
        print(f"gen_iters_per_s: {rate:.4g}")
        print(f"speedup_vs_nu_gan: {rate / reference:.3f}")
        print(f"loader_crops_per_s: {loader:.0f}")
        cohort = args.store or cohort_store(Path(tmp), args.s3_copies)
        s3_rate, local_rate = loader_rate_s3(cohort, complete_slides(open_store(cohort)),
                                             device, args.workers, args.loader_batches)
        print(f"loader_crops_per_s_local_same_rounds: {local_rate:.0f}")
        print(f"loader_crops_per_s_s3: {s3_rate:.0f}")
        print(f"loader_s3_vs_local: {s3_rate / local_rate:.2f}")


if __name__ == "__main__":
    main()
