"""Losses, steps, checkpoints and whole training runs on crops of a real store."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import TRAIN_SLIDE as SLIDE

from wsicell.cli.train import train as train_command
from wsicell.config import TrainConfig, WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.store import open_store, slide_crops
from wsicell.learning.augment import prepare_batch
from wsicell.learning.device import resolve_device
from wsicell.learning.model import build_model
from wsicell.learning.saved_model import load_trained_model, weights_id
from wsicell.learning.trainer import (
    Trainer,
    gradient_penalty,
    invariant_information,
    marginal_entropy,
    mean_entropy,
)
from wsicell.pipeline.training import train
from wsicell.viz.figures import image_is_blank

TINY = WsicellConfig(train=TrainConfig(width=8, batch_size=16, critic_steps=2, shuffle_buffer=64))
RUN = dict(device="cpu", checkpoint_every=2, sample_every=2, workers=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(train_store):
    return train_store


@pytest.fixture(scope="module")
def crops(store):
    return slide_crops(open_store(store), SLIDE)[:]


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A 4-iteration run, checkpointed every 2 iterations."""
    return train(store, tmp_path_factory.mktemp("run") / "model", TINY, max_iters=4, **RUN)


def test_training_logs_the_cluster_occupancy_of_real_cells(trained):
    """Every sample_every (2) iterations log.jsonl holds how many of a fixed sample of real
    crops Q puts in each cluster; occupancy.png draws it."""
    rows = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    watched = {r["iteration"]: r["occupancy"] for r in rows if "occupancy" in r}
    assert sorted(watched) == [2, 4]
    n_crops = json.loads((trained / "config.json").read_text())["n_crops"]
    for counts in watched.values():
        assert len(counts) == TINY.train.categories and sum(counts) == min(1024, n_crops)
    assert not image_is_blank(trained / "occupancy.png")


def test_gradient_penalty_of_a_linear_critic_is_analytic():
    weight = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.02

    def critic(x):
        return (x * weight).sum(dim=(1, 2, 3)) + 0.5

    real, fake = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    expected = (weight.norm() - 1) ** 2
    generator = torch.Generator().manual_seed(1)
    assert gradient_penalty(critic, real, fake, generator).item() == pytest.approx(expected.item(),
                                                                                     rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the penalty stays in float32
        penalty = gradient_penalty(critic, real.bfloat16(), fake.bfloat16(), generator)
    assert penalty.dtype == torch.float32
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_penalty_is_differentiable_in_the_critic_parameters():
    model = build_model(5, 32, 8, seed=0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    penalty = gradient_penalty(model.critic, x, x.flip(0), torch.Generator().manual_seed(0))
    penalty.backward()
    assert model.trunk.blocks[0].conv1.weight.grad.abs().sum() > 0


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module, before):
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items()
               if v.is_floating_point() and "running" not in k)


def test_each_step_updates_its_own_parameters(crops):
    model = build_model(5, 32, 8, seed=0)
    trainer = Trainer(model, TINY, torch.device("cpu"))
    real = prepare_batch(torch.from_numpy(crops[:16]), trainer.generator, rotate=True)
    parts = {"G": model.generator, "trunk": model.trunk, "critic": model.critic_head,
             "Q": model.q_head}
    expected = {"critic": {"trunk", "critic"}, "generator": {"G"}, "info": {"G", "trunk", "Q"}}
    steps = {"critic": lambda: trainer.critic_step(real), "generator": trainer.generator_step,
             "info": lambda: trainer.info_step(real)}
    for name, step in steps.items():
        before = {p: snapshot(m) for p, m in parts.items()}
        losses = step()
        assert all(torch.isfinite(loss) for loss in (losses if isinstance(losses, tuple)
                                                      else (losses,)))
        assert {p for p, m in parts.items() if changed(m, before[p])} == expected[name], name


def test_invariant_information_is_ln_k_for_confident_balanced_agreement_and_0_for_none():
    confident = torch.eye(5).repeat(4, 1) * 50  # 20 images, each category 4 times
    assert invariant_information(confident, confident).item() == pytest.approx(np.log(5), abs=1e-4)
    assert invariant_information(torch.zeros(20, 5), confident).item() == pytest.approx(0, abs=1e-6)
    one_category = torch.zeros(20, 5)
    one_category[:, 0] = 50
    assert invariant_information(one_category, one_category).item() == pytest.approx(0, abs=1e-6)


def test_marginal_entropy_is_ln_k_for_a_balanced_batch_and_0_for_one_category():
    balanced = torch.eye(5).repeat(4, 1) * 50
    assert marginal_entropy(balanced).item() == pytest.approx(np.log(5), abs=1e-4)
    assert marginal_entropy(torch.zeros(20, 5)).item() == pytest.approx(np.log(5), abs=1e-6)
    one_category = torch.zeros(20, 5)
    one_category[:, 0] = 50
    assert marginal_entropy(one_category).item() == pytest.approx(0, abs=1e-6)


def test_mean_entropy_is_0_for_confident_crops_and_ln_k_for_uniform_ones():
    confident = torch.eye(5).repeat(4, 1) * 50
    assert mean_entropy(confident).item() == pytest.approx(0, abs=1e-6)
    assert mean_entropy(torch.zeros(20, 5)).item() == pytest.approx(np.log(5), abs=1e-6)
    # the marginal term cannot tell these apart, the mean entropy can
    assert marginal_entropy(confident).item() == pytest.approx(marginal_entropy(
        torch.zeros(20, 5)).item(), abs=1e-4)


@pytest.mark.parametrize("term", ["lambda_cluster", "lambda_marginal", "lambda_confidence"])
def test_real_crop_terms_train_the_trunk_and_q_on_real_crops(crops, term):
    config = TINY.model_copy(update={"train": TINY.train.model_copy(
        update={"lambda_info": 0.0, term: 1.0})})
    model = build_model(5, 32, 8, seed=0)
    trainer = Trainer(model, config, torch.device("cpu"))
    real = prepare_batch(torch.from_numpy(crops[:16]), trainer.generator, rotate=True)
    before = {name: snapshot(part) for name, part in
              {"G": model.generator, "trunk": model.trunk, "Q": model.q_head}.items()}
    assert trainer.info_step(real).item() == 0  # L_Q logs the paper's term only
    assert changed(model.trunk, before["trunk"]) and changed(model.q_head, before["Q"])
    assert not changed(model.generator, before["G"])


def test_training_writes_a_complete_model_dir(trained, crops):
    names = {p.name for p in trained.iterdir()}
    assert {"model.pt", "config.json", "checkpoint.pt", "log.jsonl", "losses.png",
            "samples.png"} <= names
    rows = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite([r["V"], r["L_D"], r["L_G"], r["L_Q"]]).all() for r in rows)
    meta = json.loads((trained / "config.json").read_text())
    assert meta["config"] == TINY.to_json() and meta["iterations"] == 4
    assert meta["slides"] == [SLIDE] and meta["wsicell_version"]

    model = load_trained_model(trained)
    assert (model.k, model.crop_size, model.model_id) == (5, 32, meta["model_id"])
    assert model.config == TINY
    assert load_trained_model(trained).model_id == model.model_id
    proba = model.classify(crops[:40], batch_size=16)
    assert proba.shape == (40, 5) and proba.dtype == np.float32
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert model.features(crops[:3]).shape == (3, 4 * 8 * 16)
    assert model.classify(crops[:0]).shape == (0, 5)
    grid = model.generate_grid(2, seed=1)
    assert grid.shape == (2, 5, 32, 32, 3) and grid.dtype == np.uint8
    with pytest.raises(WsicellError, match="expected uint8 crops"):
        model.classify(crops[:4, :16])


def test_resumed_run_equals_the_uninterrupted_run(store, trained, tmp_path):
    out = tmp_path / "model"
    train(store, out, TINY, max_iters=2, **RUN)
    train(store, out, TINY, max_iters=4, resume=True, **RUN)
    whole = torch.load(trained / "model.pt", weights_only=True)["state_dict"]
    parts = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert weights_id(whole) == weights_id(parts)

    def losses(path):
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (path / "log.jsonl").read_text().splitlines()]
    assert losses(out) == losses(trained)


def test_resume_rejects_corrupt_foreign_and_mismatched_checkpoints(store, trained, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(trained, out)
    with pytest.raises(WsicellError, match="already holds a training run"):
        train(store, out, TINY, max_iters=5, **RUN)
    other = TINY.model_copy(update={"train": TINY.train.model_copy(update={"lr": 1e-3})})
    with pytest.raises(WsicellError, match="other settings.*lr"):
        train(store, out, other, max_iters=5, resume=True, **RUN)
    checkpoint = out / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(WsicellError, match="not a readable checkpoint"):
        train(store, out, TINY, max_iters=5, resume=True, **RUN)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint)
    with pytest.raises(WsicellError, match="not a wsicell training checkpoint"):
        train(store, out, TINY, max_iters=5, resume=True, **RUN)
    torch.save({"payload": np.random.default_rng(0)}, checkpoint)  # not loadable weights-only
    with pytest.raises(WsicellError, match="not a readable checkpoint"):
        train(store, out, TINY, max_iters=5, resume=True, **RUN)
    checkpoint.unlink()
    with pytest.raises(WsicellError, match="no checkpoint"):
        train(store, out, TINY, max_iters=5, resume=True, **RUN)


def test_stores_without_training_data_are_rejected(store, tmp_path):
    empty = tmp_path / "empty.zarr"
    open_store(empty, mode="a")
    with pytest.raises(WsicellError, match="no complete slide"):
        train(empty, tmp_path / "m1", TINY, max_iters=1, **RUN)
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(store, incomplete)
    zarr.open_group(incomplete / "slides" / SLIDE, mode="r+").attrs["status"] = "ingesting"
    with pytest.warns(UserWarning, match="incomplete"), \
            pytest.raises(WsicellError, match="no complete slide"):
        train(incomplete, tmp_path / "m2", TINY, max_iters=1, **RUN)
    with pytest.raises(WsicellError, match="no complete slide"):
        train(store, tmp_path / "m3", TINY, slides=["nope"], max_iters=1, **RUN)
    with pytest.raises(WsicellError, match="no such cell store"):
        train(tmp_path / "missing.zarr", tmp_path / "m4", TINY, max_iters=1, **RUN)
    with pytest.raises(WsicellError, match="not a trained wsicell model"):
        load_trained_model(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(WsicellError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(WsicellError, match="expected auto, cpu"):
        resolve_device("tpu")
    assert resolve_device("auto").type == "cpu"


def test_command_line_trains_and_explains_the_curves(store, tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(train_command, ["--help"]).output
    assert "level off" in help_text and "L_Q" in help_text and "torchrun" in help_text
    assert "[default: 5]" in help_text  # the paper's k
    result = runner.invoke(train_command, [
        "--store", str(store), "--out", str(tmp_path / "m"), "--width", "8", "--batch-size",
        "16", "--critic-steps", "2", "--max-iters", "2", "--workers", "0", "--device", "cpu",
        "--quiet", "--stain-augment", "0.05"])
    assert result.exit_code == 0, result.output
    model = load_trained_model(tmp_path / "m")
    assert model.config.train.critic_steps == 2 and model.config.train.stain_augment == 0.05


def test_bf16_autocast_steps_are_finite(crops):
    """The mixed-precision path (used on GPUs) exercised with CPU bf16 autocast."""
    model = build_model(5, 32, 8, seed=0)
    trainer = Trainer(model, TINY, torch.device("cpu"))
    trainer.amp = torch.autocast("cpu", dtype=torch.bfloat16)
    real = prepare_batch(torch.from_numpy(crops[:16]), trainer.generator, rotate=True)
    batches = iter([real, real])
    losses = trainer.iteration(batches)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_q_step_has_its_own_learning_rate():
    config = WsicellConfig(train=TrainConfig(width=8, lr=1e-4, lr_info=1e-3))
    trainer = Trainer(build_model(5, 32, 8, seed=0), config, torch.device("cpu"))
    rates = {name: {g["lr"] for g in opt.param_groups} for name, opt in trainer.optimizers.items()}
    assert rates == {"critic": {1e-4}, "generator": {1e-4}, "info": {1e-3}}
