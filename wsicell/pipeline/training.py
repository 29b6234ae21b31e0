"""The training run: the WGAN-GP + InfoGAN of :mod:`wsicell.learning` on the crops of a store.

Outputs in the model directory: ``checkpoint.pt`` (atomic; model, optimisers, RNG states,
iteration, config, store fingerprint), ``log.jsonl`` (one line per iteration),
``losses.png``, ``samples.png`` (rows = fixed z, columns = categories), ``occupancy.png``
(the share of a fixed sample of 1,024 real cells in each of Q's clusters, logged in
``log.jsonl`` every ``sample_every`` iterations: the collapse watch) and, at the end,
the final ``model.pt`` + ``config.json`` read by
:func:`wsicell.learning.saved_model.load_trained_model`.

Multi-GPU: run under ``torchrun --nproc-per-node N``; each rank streams its own share of the
store.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import wsicell
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.store import complete_slides, open_store, slide_crops, store_fingerprint
from wsicell.learning.checkpoints import (
    CHECKPOINT,
    LOG,
    LossLog,
    load_checkpoint,
    read_loss_log,
    restore,
    save_checkpoint,
)
from wsicell.learning.data import CropStream, device_batches
from wsicell.learning.device import (
    join_process_group,
    resolve_device,
    wait_for_all_ranks,
)
from wsicell.learning.model import generator_grid
from wsicell.learning.saved_model import save_trained_model
from wsicell.learning.trainer import cluster_occupancy, new_trainer
from wsicell.viz.figures import draw_generator_grid, draw_losses, draw_occupancy

LOSSES_PNG, SAMPLES_PNG, OCCUPANCY_PNG = "losses.png", "samples.png", "occupancy.png"
OCCUPANCY_CELLS = 1024  # real crops whose clusters are watched during training


def occupancy_sample(store, slide_ids: list[str], n: int, seed: int):
    """A fixed, seeded sample of at most ``n`` real crops of the slides, (n, 32, 32, 3)
    uint8, drawn evenly over all their cells (read once, chunk by chunk)."""
    root = open_store(store)
    arrays = [slide_crops(root, s) for s in slide_ids]
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])])
    chosen = np.sort(np.random.default_rng(seed).choice(offsets[-1], min(n, offsets[-1]),
                                                        replace=False))
    parts = [array.oindex[chosen[(chosen >= lo) & (chosen < hi)] - lo]
             for array, lo, hi in zip(arrays, offsets[:-1], offsets[1:])]
    return np.concatenate([p for p in parts if len(p)])


def select_slides(store, slides: list[str] | None) -> tuple[list[str], str]:
    """The complete slides to train on and the store fingerprint of that selection."""
    root = open_store(store)
    complete = complete_slides(root)
    if not complete:
        raise WsicellError(f"{store}: the store holds no complete slide (run wsicell ingest)")
    if slides:
        missing = sorted(set(slides) - set(complete))
        if missing:
            raise WsicellError(f"{store}: no complete slide(s) {', '.join(missing)}")
        complete = sorted(set(slides))
    for slide_id in complete:  # damaged metadata is refused before anything is written
        slide_crops(root, slide_id)
    return complete, store_fingerprint(root, complete)


def total_iterations(config: WsicellConfig, n_crops: int, world_size: int) -> int:
    """Generator iterations of ``epochs`` passes over ``n_crops`` crops."""
    cfg = config.train
    crops_per_iteration = cfg.batch_size * cfg.critic_steps * world_size
    return max(1, math.ceil(cfg.epochs * n_crops / crops_per_iteration))


def train(store, out_dir, config: WsicellConfig | None = None, *, slides: list[str] | None = None,
          device: str = "auto", max_iters: int | None = None, checkpoint_every: int = 1000,
          sample_every: int = 1000, resume: bool = False, workers: int = 0,
          compile: bool = False, progress: bool = True) -> Path:
    """Train the networks on the crops of ``store`` and write the model directory.

    Parameters
    ----------
    store : path
        Zarr cell store written by ``wsicell ingest``.
    out_dir : path
        Model directory (created); holds checkpoints, the log, PNGs and the final model.
    config : WsicellConfig, optional
        ``config.train`` holds the hyper-parameters (default: the paper's).
    slides : list of str, optional
        Train on these complete slides only (default: all complete slides).
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    max_iters : int, optional
        Stop after this many iterations (default: ``epochs`` passes over the crops).
    checkpoint_every, sample_every : int
        Iterations between checkpoints / sample and loss PNGs (also written at the end).
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` exactly where it stopped.
    workers : int
        DataLoader worker processes per rank (0 = read in the training process).
    compile : bool
        ``torch.compile`` the generator and the critic/Q forward passes.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path of the model directory.

    Examples
    --------
    >>> import wsicell
    >>> config = wsicell.WsicellConfig().with_options(train={"width": 16, "lr_info": 1e-3})
    >>> model_dir = wsicell.train("cells.zarr", "model/", config, max_iters=100,
    ...                           progress=False)  # doctest: +SKIP
    """
    config = config or WsicellConfig()
    out = Path(out_dir)
    rank, world_size, torch_device = join_process_group(resolve_device(device))
    slide_ids, fingerprint = select_slides(store, slides)
    checkpoint_path = out / CHECKPOINT
    if not resume and (checkpoint_path.exists() or (out / "model.pt").exists()):
        raise WsicellError(f"{out}: already holds a training run; use --resume or another --out")
    checkpoint = load_checkpoint(checkpoint_path) if resume else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    cfg = config.train
    trainer = new_trainer(config, torch_device, world_size, rank, compile)
    model = trainer.model
    start = 0
    if checkpoint is not None:
        start = restore(trainer, checkpoint, checkpoint_path, config, fingerprint, slide_ids, rank)

    stream = CropStream(store, slide_ids, cfg.batch_size, cfg.shuffle_buffer, cfg.seed,
                        rank, world_size, workers, start_batch=start * cfg.critic_steps)
    stop = total_iterations(config, stream.n_crops, world_size)
    stop = min(stop, max_iters) if max_iters is not None else stop
    batches = device_batches(stream, workers, torch_device, trainer.generator, cfg.rotate,
                             cfg.stain_augment)

    log = LossLog(out / LOG, start, active=rank == 0)
    bar = tqdm(total=stop, initial=start, unit="it", desc="train",
               disable=not progress or rank != 0, dynamic_ncols=True)

    def save(iteration: int) -> None:
        log.flush()
        save_checkpoint(checkpoint_path, trainer, iteration, config, fingerprint, slide_ids, rank)

    def draw() -> None:
        if rank == 0:
            rows = read_loss_log(out / LOG)
            if rows:
                draw_losses(rows, f"wsicell {wsicell.__version__} training losses",
                            out / LOSSES_PNG)
            occupancy = [r for r in rows if "occupancy" in r]
            if occupancy:
                draw_occupancy(occupancy, out / OCCUPANCY_PNG)
            draw_generator_grid(generator_grid(model, 8, seed=0), out / SAMPLES_PNG)

    watched = occupancy_sample(store, slide_ids, OCCUPANCY_CELLS, cfg.seed) if rank == 0 else None
    for iteration in range(start + 1, stop + 1):
        losses = trainer.iteration(batches)
        watch = rank == 0 and (iteration % sample_every == 0 or iteration == stop)
        log.add(losses, cluster_occupancy(model, watched) if watch else None)
        bar.update(1)
        if iteration % 20 == 0 or iteration == stop:
            last = log.flush()
            if last:
                bar.set_postfix({k: f"{v:.3g}" for k, v in last.items()}, refresh=False)
        if iteration % checkpoint_every == 0 or iteration == stop:
            save(iteration)
        if iteration % sample_every == 0 or iteration == stop:
            draw()
    bar.close()
    if start >= stop:  # nothing left to run: still leave a complete model directory
        save(start)
        draw()
    if rank == 0:
        save_trained_model(out, model, config, {
            "store_fingerprint": fingerprint, "slides": slide_ids, "iterations": max(start, stop),
            "n_crops": stream.n_crops, "world_size": world_size})
    wait_for_all_ranks(world_size)
    return out
