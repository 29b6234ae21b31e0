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

Time and interruptions: a first line says what will run and an estimate follows the first
timed iterations (``say``); ``max_minutes`` ends the run at a time budget with a complete
model directory; checkpoints are also written every ``checkpoint_minutes`` and on SIGINT /
SIGTERM (after the current iteration, then :class:`TrainingInterrupted`). ``config.json``
records the iterations trained, why training stopped and its wall time.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
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
    any_rank,
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


STOP_REASONS = {
    "epochs": "the configured epochs",
    "max_iters": "--max-iters",
    "max_minutes": "--max-minutes",
    "interrupted": "interrupted (Ctrl-C)",
    "terminated": "terminated (SIGTERM)",
}
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
ESTIMATE_AFTER = 4  # iterations timed before the estimate (the first, a warm-up, excluded)
HOUR_S = 3600.0


class TrainingInterrupted(Exception):
    """A SIGINT / SIGTERM stopped training after its current iteration; the checkpoint to
    ``--resume`` from was written first.

    Attributes
    ----------
    checkpoint : Path
    iteration : int
        The last iteration trained (the checkpoint's).
    exit_code : int
        130 (SIGINT) or 143 (SIGTERM), the shell's codes for these signals.
    """

    def __init__(self, checkpoint: Path, iteration: int, signum: int):
        self.checkpoint, self.iteration = checkpoint, iteration
        self.exit_code = EXIT_CODES.get(signum, 130)
        name = "interrupted" if signum == signal.SIGINT else "terminated"
        super().__init__(f"{name} after iteration {iteration}: checkpoint {checkpoint} "
                         "(continue with --resume and the same options)")


@contextlib.contextmanager
def stop_signals(say):
    """Within the block SIGINT and SIGTERM only record themselves (the list yielded), so that
    training stops after its current iteration with a checkpoint; a second SIGINT aborts at
    once (KeyboardInterrupt).  Outside the main thread (no handlers possible) nothing changes.

    DataLoader workers forked inside the block inherit the handler and so keep running until
    the main process stops them (a terminal's Ctrl-C reaches the whole process group).
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked DataLoader worker: the main process decides
            return
        if caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        caught.append(signum)
        say(f"wsicell: {signal.Signals(signum).name} received: writing a checkpoint after the "
            "current iteration (Ctrl-C again to abort without one)")

    previous = {signum: signal.signal(signum, handler) for signum in EXIT_CODES}
    try:
        yield caught
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3 h 05 min`` or ``2.5 days``.

    Examples
    --------
    >>> [duration(s) for s in (42, 720, 11100, 216000)]
    ['42 s', '12 min', '3 h 05 min', '2.5 days']
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes:02d} min"
    return f"{seconds / 86400:.1f} days"


def estimate_line(seconds_per_iteration: float, remaining: int, device_type: str,
                  width: int, budget_s: float | None) -> str:
    """The time estimate printed after the first timed iterations, with a hint on a CPU
    when the run takes more than an hour: the iterations that fit in one.

    Parameters
    ----------
    seconds_per_iteration : float
        Mean wall time of the timed iterations, s.
    remaining : int
        Iterations still to run.
    device_type : str
        ``cpu`` or ``cuda``.
    width : int
        The networks' width (the hint names it).
    budget_s : float or None
        What is left of ``--max-minutes``, s.

    Examples
    --------
    >>> estimate_line(2.0, 100, "cpu", 32, None)
    'estimate: 2 s per iteration, 100 iterations to go: about 3 min'
    """
    total = seconds_per_iteration * remaining
    line = (f"estimate: {seconds_per_iteration:.3g} s per iteration, {remaining} iterations "
            f"to go: about {duration(total)}")
    if budget_s is not None and total > budget_s:
        line += (f"; --max-minutes stops it after about "
                 f"{max(1, int(budget_s / seconds_per_iteration))} more iterations")
    if device_type == "cpu" and total > HOUR_S and (budget_s is None or budget_s > HOUR_S):
        fit = max(1, int(HOUR_S / seconds_per_iteration))
        line += (f"\nhint: about {fit} iterations fit in one hour at width {width} on this "
                 f"CPU (--max-iters {fit} or --max-minutes 60)")
        if width > 32:
            line += ("; --width 32 iterates about 8x faster than width 128 "
                     "(docs/training.md)")
    return line


def train(store, out_dir, config: WsicellConfig | None = None, *, slides: list[str] | None = None,
          device: str = "auto", max_iters: int | None = None, max_minutes: float | None = None,
          checkpoint_every: int = 1000, checkpoint_minutes: float | None = 5.0,
          sample_every: int = 1000, resume: bool = False, workers: int = 0,
          compile: bool = False, progress: bool = True, say=None) -> Path:
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
    max_minutes : float, optional
        Time budget of this call in minutes (wall clock, from the call): the last iteration
        is the one after which the next would not fit; the model directory is then complete
        as after any other stop (``stop_reason`` ``max_minutes`` in its ``config.json``).
    checkpoint_every, sample_every : int
        Iterations between checkpoints / sample and loss PNGs (also written at the end).
    checkpoint_minutes : float, optional
        Also write a checkpoint when this many minutes have passed since the last one
        (None = only every ``checkpoint_every`` iterations).
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` exactly where it stopped.
    workers : int
        DataLoader worker processes per rank (0 = read in the training process).
    compile : bool
        ``torch.compile`` the generator and the critic/Q forward passes.
    progress : bool
        Show a progress bar.
    say : callable, optional
        Receives the run's lines of text (what will run, the time estimate, a signal
        received); default: none printed.

    Returns
    -------
    Path of the model directory.

    Raises
    ------
    TrainingInterrupted
        After SIGINT / SIGTERM (in the main thread): the current iteration was finished and
        a checkpoint written, from which ``resume=True`` continues bit for bit.

    Examples
    --------
    >>> import wsicell
    >>> config = wsicell.WsicellConfig().with_options(train={"width": 16, "lr_info": 1e-3})
    >>> model_dir = wsicell.train("cells.zarr", "model/", config, max_minutes=60,
    ...                           progress=False)  # doctest: +SKIP
    """
    began = time.monotonic()
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
    say = say if say is not None and rank == 0 else (lambda line: None)

    cfg = config.train
    trainer = new_trainer(config, torch_device, world_size, rank, compile)
    model = trainer.final_model  # what the pictures, the watch and the saved model show
    start, wall_before = 0, 0.0
    if checkpoint is not None:
        start = restore(trainer, checkpoint, checkpoint_path, config, fingerprint, slide_ids, rank)
        wall_before = float(checkpoint.get("wall_s", 0.0))

    stream = CropStream(store, slide_ids, cfg.batch_size, cfg.shuffle_buffer, cfg.seed,
                        rank, world_size, workers, start_batch=start * cfg.critic_steps)
    epochs_stop = total_iterations(config, stream.n_crops, world_size)
    stop = min(epochs_stop, max_iters) if max_iters is not None else epochs_stop
    stop_reason = "max_iters" if stop < epochs_stop else "epochs"
    budget_s = max_minutes * 60 if max_minutes is not None else None
    batches = device_batches(stream, workers, torch_device, trainer.generator, cfg.rotate,
                             cfg.stain_augment, cfg.nucleus_px, cfg.size_channel)
    precision = "bfloat16 autocast" if trainer.bfloat16 else "float32"
    say(f"train: {describe_device(torch_device, world_size)}, {torch.get_num_threads()} "
        f"thread(s), {precision}, width {cfg.width}, {stream.n_crops} crops, iterations "
        f"{start + 1}-{stop} of {stop} ({STOP_REASONS[stop_reason]}"
        + (f", at most {max_minutes:g} min" if max_minutes is not None else "")
        + "); time estimate after the first iterations")

    log = LossLog(out / LOG, start, active=rank == 0)
    bar = tqdm(total=stop, initial=start, unit="it", desc="train",
               disable=not progress or rank != 0, dynamic_ncols=True)

    def save(iteration: int) -> None:
        log.flush()
        save_checkpoint(checkpoint_path, trainer, iteration, config, fingerprint, slide_ids,
                        rank, wall_s=wall_before + time.monotonic() - began)

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
    durations: list[float] = []  # seconds of this call's iterations
    last_checkpoint = time.monotonic()
    iteration, estimated = start, False
    with stop_signals(say) as caught:
        for iteration in range(start + 1, stop + 1):
            tick = time.monotonic()
            losses = trainer.iteration(batches)
            if budget_s is not None or not estimated:
                losses = losses.cpu()  # wait for the device, so that the timing is honest
            now = time.monotonic()
            durations.append(now - tick)
            # the first iteration warms the kernels up: the estimates use the later ones
            per_iteration = float(np.mean(durations[1:][-20:] or durations))
            # all ranks take the same decisions: stop (signal, budget), checkpoint (clock)
            signalled, no_time, timed_out = any_rank([
                bool(caught),
                budget_s is not None and now - began + per_iteration > budget_s,
                checkpoint_minutes is not None
                and now - last_checkpoint >= checkpoint_minutes * 60], world_size, torch_device)
            last = iteration == stop
            if no_time and not last:  # the next iteration would end past the budget
                last, stop_reason = True, "max_minutes"
            watch = rank == 0 and (iteration % sample_every == 0 or last)
            occupancy = (cluster_occupancy(model, watched, cfg.nucleus_px, cfg.size_channel)
                         if watch else None)
            log.add(losses, occupancy)
            if iteration % 20 == 0 or last or not estimated:
                row = log.flush()
                if row:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()}, refresh=False)
            timed = durations[1:]
            if not estimated and timed and not last and (
                    len(timed) >= ESTIMATE_AFTER - 1 or sum(durations) > 30):
                estimated, seconds = True, float(np.mean(timed))
                say(estimate_line(seconds, stop - iteration, torch_device.type, cfg.width,
                                  None if budget_s is None else budget_s - (now - began)))
                total = now - began + seconds * (stop - iteration)
                bar.set_description(f"train (est. {duration(total)} in all)", refresh=False)
            bar.update(1)
            if iteration % checkpoint_every == 0 or last or signalled or timed_out:
                save(iteration)
                last_checkpoint = time.monotonic()
            if signalled and not last:
                bar.close()
                wait_for_all_ranks(world_size)
                raise TrainingInterrupted(checkpoint_path, iteration,
                                          caught[0] if caught else signal.SIGTERM)
            if iteration % sample_every == 0 or last:
                draw()
            if last:
                break
    bar.close()
    if start >= stop:  # nothing left to run: still leave a complete model directory
        save(start)
        draw()
    if rank == 0:
        save_trained_model(out, model, config, {
            "store_fingerprint": fingerprint, "slides": slide_ids, "iterations": iteration,
            "n_crops": stream.n_crops, "world_size": world_size,
            "epochs_iterations": epochs_stop, "stop_reason": stop_reason,
            "wall_s": round(wall_before + time.monotonic() - began, 1),
            "device": torch_device.type, "precision": precision})
    wait_for_all_ranks(world_size)
    return out


def describe_device(device, world_size: int) -> str:
    """``cpu``, ``cuda:0 (NVIDIA H200)`` or ``4 x cuda (NVIDIA H200)``."""
    if device.type != "cuda":
        return "cpu" if world_size == 1 else f"{world_size} x cpu processes"
    name = f"{device} ({torch.cuda.get_device_name(device)})"
    return name if world_size == 1 else f"{world_size} x {name}"
