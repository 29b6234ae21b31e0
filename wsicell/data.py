"""Streaming the cell crops of a Zarr store to the trainer, and preparing them on the device.

Random single-crop reads from a compressed Zarr store are about 100x slower than reading
whole chunks, so :class:`CropStream` shuffles at two levels: every epoch it permutes the
store's *units* (a chunk, or an equal piece of one when there are few), deals them out to
the streams (one per DataLoader worker per DDP rank, so no crop is read twice in an epoch),
and each stream reads its units in groups of about ``shuffle_buffer`` crops that it shuffles
before cutting batches.  Batches are uint8 ``(B, 32, 32, 3)`` tensors; conversion to
``[-1, 1]`` floats and augmentation happen on the training device (:func:`prepare_batch`).

The stream is infinite (epoch after epoch) and a deterministic function of the seed, so a
run resumed after ``n`` batches skips exactly the batches it had consumed, without reading
them again (only the shuffle group it stopped in is read a second time).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsicell.errors import WsicellError
from wsicell.model import CROP_SIZE

CROP_SHAPE = (CROP_SIZE, CROP_SIZE, 3)


@dataclass(frozen=True, order=True)
class Unit:
    """A contiguous range of crops ``[start, stop)`` of one slide, inside one Zarr chunk."""

    slide: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_units(sizes: list[int], chunk_sizes: list[int], max_unit: int) -> list[Unit]:
    """Cut every slide's crops at chunk boundaries, and chunks into pieces of <= ``max_unit``.

    Parameters
    ----------
    sizes : list of int
        Number of crops of each slide.
    chunk_sizes : list of int
        Crops per Zarr chunk of each slide.
    max_unit : int
        Largest unit, in crops.
    """
    units = []
    for slide, (size, chunk) in enumerate(zip(sizes, chunk_sizes)):
        for chunk_start in range(0, size, chunk):
            chunk_stop = min(chunk_start + chunk, size)
            pieces = math.ceil((chunk_stop - chunk_start) / max_unit)
            bounds = np.linspace(chunk_start, chunk_stop, pieces + 1).round().astype(int)
            units += [Unit(slide, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    return units


def deal_units(units: list[Unit], n_streams: int, rng: np.random.Generator) -> list[list[Unit]]:
    """Shuffle the units and deal them to ``n_streams`` streams, each unit to the stream
    holding the fewest crops so far (so streams differ by at most one unit's size)."""
    heap = [(0, stream) for stream in range(n_streams)]
    dealt: list[list[Unit]] = [[] for _ in range(n_streams)]
    for index in rng.permutation(len(units)):
        load, stream = heapq.heappop(heap)
        dealt[stream].append(units[index])
        heapq.heappush(heap, (load + units[index].size, stream))
    return dealt


def group_units(units: list[Unit], shuffle_buffer: int) -> list[list[Unit]]:
    """Consecutive groups of at least ``shuffle_buffer`` crops (the last may hold fewer)."""
    groups, current, held = [], [], 0
    for unit in units:
        current.append(unit)
        held += unit.size
        if held >= shuffle_buffer:
            groups.append(current)
            current, held = [], 0
    return groups + ([current] if current else [])


def batches_before(consumed: int, worker: int, n_workers: int) -> int:
    """How many of the first ``consumed`` batches of a DataLoader came from ``worker``
    (a DataLoader takes batches from its workers in strict rotation)."""
    return len(range(worker, consumed, n_workers))


class CropStream(IterableDataset):
    """An endless, shuffled stream of uint8 crop batches from the complete slides of a store.

    Parameters
    ----------
    store : path
        The Zarr cell store.
    slide_ids : list of str
        Slides to read (complete slides of the store).
    batch_size : int
        Crops per batch.
    shuffle_buffer : int
        Crops shuffled together by each stream.
    seed : int
        Seed of every permutation.
    rank, world_size : int
        This process's DDP rank and the number of ranks.
    num_workers : int
        DataLoader workers per rank (0 = read in the main process).
    start_batch : int
        Batches of this rank already consumed (resume): they are skipped without reading.
    """

    def __init__(self, store, slide_ids: list[str], batch_size: int, shuffle_buffer: int,
                 seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 start_batch: int = 0):
        super().__init__()
        from wsicell.store import open_store, slide_crops

        if not slide_ids:
            raise WsicellError(f"{store}: no slides to train on")
        root = open_store(store)
        arrays = [slide_crops(root, slide) for slide in slide_ids]
        for slide, array in zip(slide_ids, arrays):
            if tuple(array.shape[1:]) != CROP_SHAPE or array.dtype != np.uint8:
                raise WsicellError(f"{store}: slide {slide} holds crops of shape "
                                   f"{array.shape[1:]} {array.dtype}, expected {CROP_SHAPE} uint8")
        self.store = str(store)
        self.slide_ids = list(slide_ids)
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.n_workers = max(num_workers, 1)
        self.start_batch = start_batch
        self.n_crops = sum(a.shape[0] for a in arrays)
        n_streams = world_size * self.n_workers
        if self.n_crops < 2 * n_streams * batch_size:
            raise WsicellError(
                f"{store}: {self.n_crops} crops are too few for batches of {batch_size} over "
                f"{n_streams} streams (ranks x loader workers); use smaller batches or fewer "
                "workers")
        max_unit = max(1, self.n_crops // (4 * n_streams))
        self.units = plan_units([a.shape[0] for a in arrays], [a.chunks[0] for a in arrays],
                                max_unit)
        self._arrays = None

    def arrays(self) -> list:
        """The slides' crop arrays, opened once per process (workers open their own)."""
        if self._arrays is None:
            from wsicell.store import open_store, slide_crops

            root = open_store(self.store)
            self._arrays = [slide_crops(root, slide) for slide in self.slide_ids]
        return self._arrays

    def stream_units(self, epoch: int, stream: int) -> list[Unit]:
        """The units stream ``stream`` reads in ``epoch``, in reading order."""
        rng = np.random.default_rng([self.seed, epoch])
        return deal_units(self.units, self.world_size * self.n_workers, rng)[stream]

    def __iter__(self):
        info = get_worker_info()
        # A new DataLoader starts its rotation at worker 0, so after ``start_batch`` batches
        # worker 0 must play the stream whose batch comes next.
        worker = ((info.id if info is not None else 0) + self.start_batch) % self.n_workers
        stream = self.rank * self.n_workers + worker
        skip = batches_before(self.start_batch, worker, self.n_workers)
        for epoch in itertools.count():
            units = self.stream_units(epoch, stream)
            n_batches = sum(u.size for u in units) // self.batch_size
            if skip >= n_batches:
                skip -= n_batches
                continue
            yield from self._epoch_batches(epoch, stream, units, skip * self.batch_size)
            skip = 0

    def _epoch_batches(self, epoch: int, stream: int, units: list[Unit], skip_crops: int):
        """Batches of one epoch of one stream, starting ``skip_crops`` crops into it."""
        arrays = self.arrays()
        pending, held, position = [], 0, 0
        for index, group in enumerate(group_units(units, self.shuffle_buffer)):
            size = sum(u.size for u in group)
            position, group_start = position + size, position
            if position <= skip_crops:
                continue
            crops = np.concatenate([arrays[u.slide][u.start:u.stop] for u in group])
            order = np.random.default_rng([self.seed, epoch, stream, index]).permutation(size)
            pending.append(crops[order[max(skip_crops - group_start, 0):]])
            held += len(pending[-1])
            if held >= self.batch_size:
                crops = np.concatenate(pending)
                for start in range(0, len(crops) - self.batch_size + 1, self.batch_size):
                    yield torch.from_numpy(crops[start:start + self.batch_size])
                rest = len(crops) % self.batch_size
                pending = [crops[len(crops) - rest:]] if rest else []
                held = rest


def crop_loader(stream: CropStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over a :class:`CropStream` (which batches itself)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def check_crops(crops: np.ndarray, source: str = "crops") -> np.ndarray:
    """Validate a batch of crops: uint8 (N, 32, 32, 3); raise :class:`WsicellError` otherwise."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != CROP_SHAPE or crops.dtype != np.uint8:
        raise WsicellError(f"{source}: expected uint8 crops of shape (N, {CROP_SIZE}, "
                           f"{CROP_SIZE}, 3), got {crops.dtype} {crops.shape}")
    return crops


def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (on the batch's device)."""
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


# Optical-density colours of hematoxylin, eosin and a residual channel (rows; Ruifrok &
# Johnston 2001, as in scikit-image's ``rgb_from_hed``).
HED_FROM_OD = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_OD = HED_FROM_OD / HED_FROM_OD.norm(dim=1, keepdim=True)


def stain_jitter(rgb: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Random stain perturbation in hematoxylin/eosin optical-density space.

    Each crop's hematoxylin and eosin concentrations are scaled by ``U(1-sigma, 1+sigma)``
    and shifted by ``U(-sigma, sigma)`` (Tellez et al. 2018); the residual channel is kept.

    Parameters
    ----------
    rgb : Tensor, shape (B, 3, H, W), float in [0, 255]
    sigma : float
        Perturbation strength (0 leaves the crops unchanged).
    generator : torch.Generator on the device of ``rgb``

    Returns
    -------
    Tensor, shape (B, 3, H, W), float in [0, 255]
    """
    stains = HED_FROM_OD.to(rgb.device)
    od = -torch.log((rgb + 1.0) / 256.0)
    concentration = torch.einsum("bchw,cs->bshw", od, torch.linalg.inv(stains))
    b = rgb.shape[0]
    draw = torch.rand(2, b, 3, 1, 1, generator=generator, device=rgb.device) * 2 - 1
    keep = torch.tensor([1.0, 1.0, 0.0], device=rgb.device).view(1, 3, 1, 1)
    concentration = concentration * (1 + sigma * draw[0] * keep) + sigma * draw[1] * keep
    od = torch.einsum("bshw,sc->bchw", concentration, stains)
    return (256.0 * torch.exp(-od) - 1.0).clamp_(0, 255)


def random_rotation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image of (B, C, H, W) by a random multiple of 90 degrees (0/90/180/270)."""
    turns = torch.randint(0, 4, (x.shape[0],), generator=generator, device=x.device)
    out = x
    for k in (1, 2, 3):
        out = torch.where((turns == k).view(-1, 1, 1, 1), torch.rot90(x, k, dims=(2, 3)), out)
    return out


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of (B, C, H, W) rotated by a random multiple of 90 degrees and mirrored
    with probability 1/2: a random one of the square's 8 symmetries."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return random_rotation(x, generator)


def prepare_batch(batch: torch.Tensor, generator: torch.Generator | None = None,
                  rotate: bool = False, stain_sigma: float = 0.0) -> torch.Tensor:
    """uint8 crops (B, 32, 32, 3) on the device -> augmented float (B, 3, 32, 32) in [-1, 1].

    Augmentations (they need ``generator``): the stain perturbation of :func:`stain_jitter`
    when ``stain_sigma > 0``, then a random rotation by 0/90/180/270 degrees when ``rotate``.
    """
    if stain_sigma > 0:
        x = stain_jitter(batch.permute(0, 3, 1, 2).float(), stain_sigma, generator)
        x = x.div_(127.5).sub_(1.0)
    else:
        x = to_unit_range(batch)
    return random_rotation(x, generator) if rotate else x
