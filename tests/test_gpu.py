"""The trainer on a CUDA GPU: bf16 autocast and a whole run (skipped without a GPU, as on CI)."""

import json

import numpy as np
import pytest
import torch
from conftest import TRAIN_SLIDE

from wsicell.config import TrainConfig, WsicellConfig
from wsicell.io.store import open_store, slide_crops
from wsicell.learning.augment import prepare_batch
from wsicell.learning.model import build_model
from wsicell.learning.saved_model import load_trained_model
from wsicell.learning.trainer import Trainer, gradient_penalty
from wsicell.pipeline.training import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def crops(train_store):
    return slide_crops(open_store(train_store), TRAIN_SLIDE)[:64]


@pytest.fixture(scope="module")
def real(crops):
    batch = torch.from_numpy(crops).to(CUDA)
    return prepare_batch(batch, torch.Generator(CUDA).manual_seed(0), rotate=False)


def test_bf16_autocast_keeps_the_penalty_in_float32_and_the_scores_close(real):
    model = build_model(5, 32, 32, seed=0).to(CUDA)
    fake = real.flip(0)
    scores = model.critic(real)
    penalty = gradient_penalty(model.critic, real, fake, torch.Generator(CUDA).manual_seed(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        amp_scores = model.critic(real).float()
        amp_penalty = gradient_penalty(model.critic, real, fake,
                                       torch.Generator(CUDA).manual_seed(1))
    assert amp_penalty.dtype == torch.float32
    assert amp_penalty.item() == pytest.approx(penalty.item(), rel=1e-3)
    # bf16 keeps 8 bits of mantissa: the scores agree to about 1% (0.0075 of 0.92 seen on
    # an H200 at width 32)
    assert (amp_scores - scores).abs().max() < 0.02 * scores.abs().max()


def test_an_amp_iteration_on_the_gpu_steps_every_part_with_finite_losses(real):
    config = WsicellConfig(train=TrainConfig(width=32, critic_steps=2, lambda_cluster=1.0,
                                             amp=True))
    model = build_model(5, 32, 32, seed=0).to(CUDA)
    trainer = Trainer(model, config, CUDA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = trainer.iteration(iter([real, real]))
    assert losses.device.type == "cuda" and torch.isfinite(losses).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 only in autocast
    moved = {k.split(".")[0] for k, v in model.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])}
    assert {"generator", "trunk", "critic_head", "q_head"} <= moved


def test_training_on_the_gpu_writes_a_model_that_classifies(train_store, crops, tmp_path):
    config = WsicellConfig(train=TrainConfig(width=16, batch_size=32, critic_steps=2,
                                             shuffle_buffer=256))
    out = train(train_store, tmp_path / "model", config, device="cuda", max_iters=6,
                checkpoint_every=3, sample_every=3, workers=1, progress=False)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert all(np.isfinite([r["V"], r["L_D"], r["L_G"], r["L_Q"]]).all() for r in rows)
    model = load_trained_model(out, device="cuda")
    proba = model.classify(crops)
    assert proba.shape == (64, 5) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    on_cpu = load_trained_model(out, device="cpu").classify(crops)
    assert np.abs(proba - on_cpu).max() < 1e-2  # cuDNN may use TF32 for float32 convs
