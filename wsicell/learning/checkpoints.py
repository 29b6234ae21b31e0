"""The state of a training run on disk: the checkpoint it resumes from and its loss log.

``checkpoint.pt`` (written atomically) holds the model (and its moving average, when the
run keeps one), the optimisers, every RNG state, the iteration, the configuration and the
store fingerprint, so that a resumed run continues bit for bit; ``log.jsonl`` holds one
line of losses per iteration.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import wsicell
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.files import write_atomically
from wsicell.learning.trainer import LOSS_NAMES, Trainer

CHECKPOINT, LOG = "checkpoint.pt", "log.jsonl"
CHECKPOINT_FORMAT = "wsicell-train-checkpoint-v1"
CHECKPOINT_KEYS = {"iteration", "model", "optimizers", "rng", "config", "store_fingerprint",
                   "slides", "world_size"}


def _rng_state(trainer: Trainer) -> dict:
    states = [trainer.generator.get_state()]
    if trainer.world_size > 1:
        gathered = [None] * trainer.world_size
        dist.all_gather_object(gathered, states[0].cpu())
        states = gathered
    numpy_state = np.random.get_state()
    return {
        "generators": states,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(trainer: Trainer, state: dict, rank: int) -> None:
    trainer.generator.set_state(state["generators"][rank])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: Path, trainer: Trainer, iteration: int, config: WsicellConfig,
                    fingerprint: str, slides: list[str], rank: int, wall_s: float = 0.0) -> None:
    """Atomically write the full training state (collective under DDP: all ranks call it);
    ``wall_s``: seconds of training so far, over all resumed parts."""
    rng = _rng_state(trainer)
    if rank != 0:
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "wsicell_version": wsicell.__version__,
        "iteration": iteration,
        "model": trainer.model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in trainer.optimizers.items()},
        "rng": rng,
        "config": json.dumps(config.to_json()),
        "store_fingerprint": fingerprint,
        "slides": slides,
        "world_size": trainer.world_size,
        "wall_s": wall_s,
    }
    if trainer.average is not None:
        checkpoint["average"] = trainer.average.state_dict()
    write_atomically(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    if not path.is_file():
        raise WsicellError(f"{path}: no checkpoint to resume from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise WsicellError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise WsicellError(f"{path}: not a wsicell training checkpoint")
    missing = CHECKPOINT_KEYS - checkpoint.keys()
    if missing:
        raise WsicellError(f"{path}: corrupt checkpoint (no {', '.join(sorted(missing))})")
    return checkpoint


def restore(trainer: Trainer, checkpoint: dict, path: Path, config: WsicellConfig,
            fingerprint: str, slides: list[str], rank: int) -> int:
    """Load a checkpoint's state into ``trainer`` after checking it belongs to this run;
    returns the iteration to continue from."""
    try:
        saved = WsicellConfig.from_record(json.loads(checkpoint["config"]))
    except ValueError as err:
        raise WsicellError(f"{path}: corrupt checkpoint (config: {type(err).__name__})") from None
    if saved.train != config.train:
        changed = [k for k, v in config.train if getattr(saved.train, k) != v]
        raise WsicellError(f"{path}: checkpoint was trained with other settings "
                           f"({', '.join(changed)}); resume with the same options")
    if checkpoint["store_fingerprint"] != fingerprint or checkpoint["slides"] != slides:
        raise WsicellError(f"{path}: checkpoint was trained on other slides or another store")
    if checkpoint["world_size"] != trainer.world_size:
        raise WsicellError(f"{path}: checkpoint was trained with {checkpoint['world_size']} "
                           f"processes, resume with the same number")
    try:
        trainer.model.load_state_dict(checkpoint["model"])
        if trainer.average is not None:
            trainer.average.load_state_dict(checkpoint["average"])
        for name, optimizer in trainer.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        _set_rng_state(trainer, checkpoint["rng"], rank)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise WsicellError(f"{path}: corrupt checkpoint ({str(err).splitlines()[0]})") from None
    return int(checkpoint["iteration"])


class LossLog:
    """Per-iteration losses kept on the device and appended to ``log.jsonl`` in blocks
    (one host synchronisation per block, not per iteration)."""

    def __init__(self, path: Path, start: int, active: bool):
        self.path, self.active, self.pending, self.next = path, active, [], start + 1
        if active and path.exists():  # drop lines written after the checkpoint we resume from
            kept = [row for row in read_loss_log(path) if row["iteration"] <= start]
            text = "".join(json.dumps(row) + "\n" for row in kept)
            write_atomically(path, lambda f: f.write(text.encode()))

    def add(self, losses: torch.Tensor, occupancy: list[int] | None = None) -> None:
        """One iteration's losses and, when measured, Q's cluster occupancy (cells per
        cluster of the fixed sample of real crops, :func:`trainer.cluster_occupancy`)."""
        self.pending.append((losses, occupancy))

    def flush(self) -> dict | None:
        """Write pending iterations; returns the last one's losses (None when none pending)."""
        if not self.pending:
            return None
        rows = torch.stack([losses for losses, _ in self.pending]).cpu().tolist()
        occupancies = [occupancy for _, occupancy in self.pending]
        self.pending = []
        now = time.time()
        lines = []
        for row, occupancy in zip(rows, occupancies):
            entry = {"iteration": self.next, **dict(zip(LOSS_NAMES, row)), "time": now}
            if occupancy is not None:
                entry["occupancy"] = occupancy
            lines.append(json.dumps(entry))
            self.next += 1
        if self.active:
            with self.path.open("a") as log:
                log.write("".join(line + "\n" for line in lines))
        return dict(zip(LOSS_NAMES, rows[-1]))


def read_loss_log(path: Path) -> list[dict]:
    """The rows of a ``log.jsonl``: ``{"iteration", "V", "L_D", "L_G", "L_Q", "time"}`` and,
    every ``sample_every`` iterations, ``"occupancy"`` (cells per cluster of a fixed sample).

    A last line cut short (a run killed while appending it) is dropped.

    Raises
    ------
    WsicellError
        Any other line that is not one JSON object with an integer ``iteration``.
    """
    lines = [line for line in Path(path).read_text(errors="replace").splitlines()
             if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                raise ValueError("no integer iteration")
        except ValueError as err:
            if number == len(lines):
                break
            raise WsicellError(f"{path}: line {number} is not a training log entry ({err}); "
                               "remove the damaged lines or train into a new --out") from None
        rows.append(row)
    return rows
