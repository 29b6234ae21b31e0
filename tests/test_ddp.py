"""Data-parallel training with 2 processes on the CPU (gloo), launched by torchrun."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    from wsicell.config import TrainConfig, WsicellConfig
    from wsicell.learning.augment import prepare_batch
    from wsicell.learning.data import CropStream, crop_loader
    from wsicell.learning.model import build_model
    from wsicell.learning.saved_model import weights_id
    from wsicell.learning.trainer import Trainer
    from wsicell.pipeline.training import train

    store, out = sys.argv[1], sys.argv[2]
    config = WsicellConfig(train=TrainConfig(width=8, batch_size=16, critic_steps=2,
                                             shuffle_buffer=64))
    run = dict(device="cpu", checkpoint_every=1, sample_every=10, workers=0, progress=False)
    train(store, out, config, max_iters=2, **run)
    train(store, out, config, max_iters=3, resume=True, **run)

    # the ranks read different crops but keep identical parameters (batch-norm running
    # statistics are per rank, as without SyncBatchNorm)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(5, 32, 8, seed=0)
    trainer = Trainer(model, config, torch.device("cpu"), world, rank)
    stream = CropStream(store, ["BM_GRAZ_HE_0001_01"], 16, 64, 0, rank, world)
    raw = iter(crop_loader(stream, 0, False))
    first = next(raw)
    batches = (prepare_batch(b, trainer.generator, True) for b in raw)
    for _ in range(2):
        trainer.iteration(batches)
    gathered = [None] * world
    dist.all_gather_object(gathered, (weights_id(dict(model.named_parameters())),
                                     first.sum().item()))
    if rank == 0:
        ids, sums = zip(*gathered)
        assert len(set(ids)) == 1, ids
        assert len(set(sums)) == world, sums
        print("DDP-OK", ids[0], flush=True)
    # both ranks leave together: a rank that tore gloo down while its peer was still
    # finishing the gather sometimes aborted ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
''')


def test_two_process_gloo_training(train_store, tmp_path):
    store = train_store
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(store), str(tmp_path / "model")],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DDP-OK" in result.stdout
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["world_size"] == 2 and meta["iterations"] == 3
    lines = (tmp_path / "model" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]


pytestmark = pytest.mark.timeout(600)
