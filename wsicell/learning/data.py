"""Streaming the cell crops of a Zarr store to the trainer, and preparing them on the device.

Random single-crop reads from a compressed Zarr store are about 100x slower than reading
whole chunks, so :class:`CropStream` shuffles at two levels: every epoch it permutes the
store's *units* (a chunk, or an equal piece of one when there are few), deals them out to
the streams (one per DataLoader worker per DDP rank, so no crop is read twice in an epoch),
and each stream reads its units in groups of about ``shuffle_buffer`` crops that it shuffles
before cutting batches.  Batches are uint8 ``(B, 32, 32, 3)`` tensors; conversion to
``[-1, 1]`` floats and augmentation happen on the training device (:func:`wsicell.learning.augment.prepare_batch`).

Each stream keeps several unit reads in flight (``read_ahead`` threads, whole chunks in
order) so that a store on object storage, where one read is a round trip of milliseconds,
streams as fast as a local one; on a local disk reads go one at a time, as they always did.

The stream is infinite (epoch after epoch) and a deterministic function of the seed, so a
run resumed after ``n`` batches skips exactly the batches it had consumed, without reading
them again (only the shuffle group it stopped in is read a second time).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsicell.errors import WsicellError
from wsicell.io.store import is_remote, open_store, slide_crops
from wsicell.learning.augment import prepare_batch
from wsicell.learning.model import CROP_SIZE

CROP_SHAPE = (CROP_SIZE, CROP_SIZE, 3)
READ_AHEAD = 8  # unit reads each stream keeps in flight from a store on object storage


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


def unit_size(n_crops: int, chunk: int, n_streams: int, whole_chunks: bool) -> int:
    """The largest unit, in crops: a whole chunk (``chunk``: the crops of the store's
    fullest chunk) when ``whole_chunks`` is asked for and every stream's share of the
    ``n_crops`` holds at least 4 such chunks; otherwise a quarter of a stream's share (so
    that every stream gets several units and a batch every epoch, however few chunks the
    store has).

    Examples
    --------
    >>> unit_size(100_000, 4096, 2, whole_chunks=True)
    4096
    >>> unit_size(3_000, 4096, 2, whole_chunks=True)  # one chunk, two streams
    375
    """
    share = n_crops // n_streams
    if whole_chunks and share >= 4 * chunk:
        return chunk
    return max(1, min(chunk, share // 4))


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


def read_ahead(read, items, depth: int):
    """``read(item)`` of every item, in order, with up to ``depth`` reads in flight.

    Parameters
    ----------
    read : callable
        Reads one item (in a thread: it must be thread-safe, as zarr's reads are).
    items : iterable
    depth : int
        Reads in flight; 1 reads one at a time in the calling thread.

    Examples
    --------
    >>> list(read_ahead(lambda x: x * x, range(5), depth=3))
    [0, 1, 4, 9, 16]
    """
    if depth <= 1:
        yield from map(read, items)
        return
    pool = ThreadPoolExecutor(depth, thread_name_prefix="wsicell-read")
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    read_ahead : int, optional
        Unit reads each stream keeps in flight (default: ``READ_AHEAD`` for a store on
        object storage, 1 on a local disk).
    whole_chunks : bool, optional
        Units are whole chunks where the store holds enough of them (default: on object
        storage, where a piece costs the request of its whole chunk); see :func:`unit_size`.
    """

    def __init__(self, store, slide_ids: list[str], batch_size: int, shuffle_buffer: int,
                 seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 start_batch: int = 0, read_ahead: int | None = None,
                 whole_chunks: bool | None = None):
        super().__init__()
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
        remote = is_remote(store)
        self.read_ahead = read_ahead or (READ_AHEAD if remote else 1)
        self.n_crops = sum(a.shape[0] for a in arrays)
        n_streams = world_size * self.n_workers
        if self.n_crops < 2 * n_streams * batch_size:
            raise WsicellError(
                f"{store}: {self.n_crops} crops are too few for batches of {batch_size} over "
                f"{n_streams} streams (ranks x loader workers); use smaller batches or fewer "
                "workers")
        fullest_chunk = max(min(a.chunks[0], a.shape[0]) for a in arrays)
        max_unit = unit_size(self.n_crops, fullest_chunk, n_streams,
                             remote if whole_chunks is None else whole_chunks)
        self.units = plan_units([a.shape[0] for a in arrays], [a.chunks[0] for a in arrays],
                                max_unit)
        self._arrays = None

    def arrays(self) -> list:
        """The slides' crop arrays, opened once per process (workers open their own)."""
        if self._arrays is None:
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
        # one read-ahead for all epochs: the next epoch's first chunks are in flight while
        # this one's last batches are cut
        epochs, ahead = itertools.tee(self._epoch_groups(stream, skip))
        arrays = self.arrays()
        reads = read_ahead(lambda u: arrays[u.slide][u.start:u.stop],
                           (u for _, groups, _ in ahead for _, group, _, _ in groups
                            for u in group), self.read_ahead)
        for epoch, groups, skip_crops in epochs:
            yield from self._epoch_batches(epoch, stream, groups, skip_crops, reads)

    def _epoch_groups(self, stream: int, skip: int):
        """Every epoch of a stream from the first that has a batch left after ``skip``
        batches: ``(epoch, groups, skip_crops)``, the shuffle groups to read as ``(index,
        units, size, first crop)`` and the crops of the first to skip."""
        for epoch in itertools.count():
            units = self.stream_units(epoch, stream)
            n_batches = sum(u.size for u in units) // self.batch_size
            if skip >= n_batches:
                skip -= n_batches
                continue
            skip_crops, skip = skip * self.batch_size, 0
            groups, position = [], 0
            for index, group in enumerate(group_units(units, self.shuffle_buffer)):
                size = sum(u.size for u in group)
                position, group_start = position + size, position
                if position > skip_crops:
                    groups.append((index, group, size, group_start))
            yield epoch, groups, skip_crops

    def _epoch_batches(self, epoch: int, stream: int, groups: list, skip_crops: int, reads):
        """Batches of one epoch of one stream, starting ``skip_crops`` crops into it; the
        units of ``groups`` come from ``reads`` in order."""
        pending, held = [], 0
        for index, group, size, group_start in groups:
            crops = np.concatenate([next(reads) for _ in group])
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


def device_batches(stream: CropStream, num_workers: int, device: torch.device,
                   generator: torch.Generator, rotate: bool, stain_sigma: float,
                   nucleus_px: float = 0.0, size_channel: float = 0.0):
    """The stream's batches on ``device``, prepared and augmented there
    (:func:`wsicell.learning.augment.prepare_batch`): float (B, C, 32, 32) in [-1, 1]."""
    pin = device.type == "cuda"
    for batch in crop_loader(stream, num_workers, pin):
        yield prepare_batch(batch.to(device, non_blocking=pin), generator, rotate, stain_sigma,
                            nucleus_px, size_channel)


def check_crops(crops: np.ndarray, source: str = "crops") -> np.ndarray:
    """Validate a batch of crops: uint8 (N, 32, 32, 3); raise :class:`WsicellError` otherwise."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != CROP_SHAPE or crops.dtype != np.uint8:
        raise WsicellError(f"{source}: expected uint8 crops of shape (N, {CROP_SIZE}, "
                           f"{CROP_SIZE}, 3), got {crops.dtype} {crops.shape}")
    return crops
