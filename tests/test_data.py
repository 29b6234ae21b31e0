"""Streaming crops from a real store: coverage without duplicates, exact skipping, and the
on-device conversion and augmentation."""

import numpy as np
import pytest
import torch
from conftest import TRAIN_SLIDE as SLIDE

from wsicell.errors import WsicellError
from wsicell.io.store import open_store, slide_crops
from wsicell.learning.augment import prepare_batch, stain_jitter, to_unit_range
from wsicell.learning.data import (
    CropStream,
    batches_before,
    check_crops,
    crop_loader,
    deal_units,
    group_units,
    plan_units,
    unit_size,
)

BATCH = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(train_store):
    return train_store


@pytest.fixture(scope="module")
def all_crops(store):
    return slide_crops(open_store(store), SLIDE)[:]


def as_rows(batches):
    return [row.tobytes() for b in batches for row in b.numpy().reshape(len(b), -1)]


def test_units_cover_every_crop_once_and_deal_evenly():
    units = plan_units([300, 70], [128, 128], max_unit=50)
    covered = [(u.slide, i) for u in units for i in range(u.start, u.stop)]
    assert sorted(covered) == [(0, i) for i in range(300)] + [(1, i) for i in range(70)]
    assert all(u.size <= 50 and u.start // 128 == (u.stop - 1) // 128 for u in units)
    dealt = deal_units(units, 3, np.random.default_rng(0))
    loads = [sum(u.size for u in d) for d in dealt]
    assert sorted(u for d in dealt for u in d) == sorted(units)
    assert max(loads) - min(loads) <= 50
    groups = group_units(dealt[0], 100)
    assert [u for g in groups for u in g] == dealt[0]
    assert all(sum(u.size for u in g) >= 100 for g in groups[:-1])


def test_batches_before_follows_the_loader_rotation():
    assert [batches_before(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert batches_before(0, 0, 2) == 0


def test_ranks_read_disjoint_crops_covering_the_epoch(store, all_crops):
    seen = []
    for rank in range(2):
        stream = CropStream(store, [SLIDE], BATCH, 64, seed=1, rank=rank, world_size=2)
        n = sum(u.size for u in stream.stream_units(0, rank))
        epoch = [b for b, _ in zip(iter(stream), range(n // BATCH))]
        assert all(b.shape == (BATCH, 32, 32, 3) and b.dtype == torch.uint8 for b in epoch)
        seen += as_rows(epoch)
    assert len(set(seen)) == len(seen)  # no crop twice in an epoch
    assert set(seen) <= set(as_rows([torch.from_numpy(all_crops)]))
    assert len(all_crops) - len(seen) < 2 * BATCH  # only each stream's last partial batch is left


def test_epochs_are_shuffled_differently(store):
    stream = CropStream(store, [SLIDE], BATCH, 64, seed=1)
    per_epoch = len(all_rows := as_rows([b for b, _ in zip(iter(stream), range(40))])) // 2
    assert all_rows[:BATCH] != all_rows[per_epoch:per_epoch + BATCH]


def test_resumed_loader_continues_exactly(store):
    """With 2 worker processes, skipping 7 batches equals dropping the first 7 batches."""
    full = CropStream(store, [SLIDE], BATCH, 64, seed=2, num_workers=2)
    reference = [b.clone() for b, _ in zip(crop_loader(full, 2, False), range(40))]
    resumed = CropStream(store, [SLIDE], BATCH, 64, seed=2, num_workers=2, start_batch=7)
    again = [b.clone() for b, _ in zip(crop_loader(resumed, 2, False), range(33))]
    assert all(torch.equal(a, b) for a, b in zip(again, reference[7:]))


def test_whole_chunks_never_leave_a_stream_without_a_batch(store):
    """Whole-chunk units (the object-storage default) on a store with fewer chunks than
    streams: the chunks are cut so that every stream still gets a batch every epoch (a
    stream without one used to spin forever looking for an epoch that had one)."""
    n_chunks = -(-slide_crops(open_store(store), SLIDE).shape[0] // 128)
    assert n_chunks < 8
    for rank in range(2):
        stream = CropStream(store, [SLIDE], BATCH, 64, seed=0, rank=rank, world_size=2,
                            num_workers=4, whole_chunks=True)
        for epoch in range(5):
            for worker in range(4):
                units = stream.stream_units(epoch, rank * 4 + worker)
                assert sum(u.size for u in units) >= BATCH
        batches = [b for b, _ in zip(iter(stream), range(3))]
        assert len(batches) == 3
    assert unit_size(100_000, 128, 8, whole_chunks=True) == 128


def test_too_few_crops_for_the_streams(store):
    with pytest.raises(WsicellError, match="too few"):
        CropStream(store, [SLIDE], 256, 64, seed=0, world_size=2)


def test_prepare_batch_range_and_rotations(all_crops):
    batch = torch.from_numpy(all_crops[:32])
    plain = to_unit_range(batch)
    assert plain.shape == (32, 3, 32, 32) and plain.dtype == torch.float32
    assert plain.min() >= -1 and plain.max() <= 1
    assert torch.equal(plain[0].permute(1, 2, 0), batch[0].float() / 127.5 - 1)
    rotated = prepare_batch(batch, torch.Generator().manual_seed(0), rotate=True)
    turns = [next(k for k in range(4) if torch.equal(r, torch.rot90(p, k, dims=(1, 2))))
             for r, p in zip(rotated, plain)]
    assert len(set(turns)) == 4  # all four rotations occur in 32 crops


def test_stain_jitter_is_an_optical_density_perturbation(all_crops):
    rgb = torch.from_numpy(all_crops[:8]).permute(0, 3, 1, 2).float()
    generator = torch.Generator().manual_seed(0)
    assert torch.allclose(stain_jitter(rgb, 0.0, generator), rgb, atol=1e-2)
    jittered = stain_jitter(rgb, 0.2, generator)
    assert jittered.min() >= 0 and jittered.max() <= 255
    change = (jittered - rgb).abs().mean(dim=(1, 2, 3))
    assert (change > 1).all()  # every crop is recoloured, by its own draw
    assert len(set(change.round(decimals=3).tolist())) == 8
    augmented = prepare_batch(rgb.permute(0, 2, 3, 1).to(torch.uint8), generator, stain_sigma=0.2)
    assert augmented.min() >= -1 and augmented.max() <= 1


def test_check_crops_rejects_wrong_shapes():
    check_crops(np.zeros((2, 32, 32, 3), np.uint8))
    for bad in (np.zeros((2, 32, 32), np.uint8), np.zeros((2, 64, 64, 3), np.uint8),
                np.zeros((2, 32, 32, 3), np.float32)):
        with pytest.raises(WsicellError, match="expected uint8 crops"):
            check_crops(bad)
