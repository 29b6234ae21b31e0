"""Losses, steps, checkpoints and whole training runs on crops of a real store."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import TRAIN_SLIDE as SLIDE

from wsicell.cli.train import train as train_command
from wsicell.config import TrainConfig, WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.store import open_store, slide_crops, slide_masks
from wsicell.learning.augment import fit_nuclei, prepare_batch, to_unit_range
from wsicell.learning.device import (
    cpu_supports_bfloat16,
    free_cpu_threads,
    resolve_device,
    uses_bfloat16,
)
from wsicell.learning.model import build_model
from wsicell.learning.saved_model import load_trained_model, weights_id
from wsicell.learning.trainer import (
    Trainer,
    gradient_penalty,
    invariant_information,
    marginal_entropy,
    mean_entropy,
    warmed_up_average,
)
from wsicell.pipeline.training import estimate_line, train
from wsicell.viz.figures import image_is_blank
from wsicell.viz.report import training_caveat, training_run_table, value_trend

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
def masks(store):
    return slide_masks(open_store(store), SLIDE)[:]


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
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 unless asked otherwise
        penalty = gradient_penalty(critic, real.bfloat16(), fake.bfloat16(), generator)
    assert penalty.dtype == torch.float32
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.skipif(not cpu_supports_bfloat16(), reason="this CPU has no native bfloat16")
def test_penalty_under_bf16_autocast_matches_float32(crops):
    """The critic's pass on x_hat under bf16 autocast (what the trainer does on a bf16 CPU):
    the penalty (a float32 scalar) agrees with float32 to 3%, and its gradient in the
    critic's parameters to 10% (relative L2), cosine >= 0.99."""
    real = prepare_batch(torch.from_numpy(crops[:32]), torch.Generator().manual_seed(0), True)
    fake = real.flip(0) * 0.5
    results = []
    for autocast in (None, torch.autocast("cpu", dtype=torch.bfloat16)):
        model = build_model(5, 32, 16, seed=0)
        penalty = gradient_penalty(model.critic, real, fake, torch.Generator().manual_seed(1),
                                   autocast)
        penalty.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameter_groups()["critic"]
                           if p.grad is not None])
        results.append((penalty, grads))
    (p32, g32), (p16, g16) = results
    assert p16.dtype == torch.float32 and p16.item() != p32.item()  # bf16 really ran
    assert p16.item() == pytest.approx(p32.item(), rel=0.03)
    assert ((g16 - g32).norm() / g32.norm()).item() <= 0.10
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0).item() >= 0.99


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


def test_q_learns_the_continuous_codes_from_g_s_samples():
    """With continuous codes, Q steps on G's samples make Q's estimates follow the codes
    G was given (the squared error falls well below a guess's 1/3)."""
    config = TINY.model_copy(update={"train": TINY.train.model_copy(
        update={"continuous_codes": 2, "lambda_marginal": 0.0, "lr_info": 1e-3})})
    model = build_model(5, 32, 8, seed=0, continuous=2)
    trainer = Trainer(model, config, torch.device("cpu"))

    def error() -> float:
        with torch.no_grad():
            fake, _, code = trainer._fake(256)
            return torch.nn.functional.mse_loss(model.q_outputs(fake.float())[:, 5:],
                                                code[:, 5:]).item()

    before = error()
    for _ in range(60):
        trainer.info_step(None)
    assert before > 0.2 and error() < 0.5 * before


def test_fit_nuclei_gives_small_and_large_real_nuclei_one_size(crops, masks):
    x = to_unit_range(torch.from_numpy(crops[:64]))
    fitted = fit_nuclei(x, 24)
    inside = (fitted < 1 - 0.05).any(dim=1)  # the nucleus, past the bilinear fringe
    extent = torch.maximum(inside.any(dim=2).sum(1), inside.any(dim=1).sum(1))
    before = np.maximum(masks[:64].any(axis=2).sum(1), masks[:64].any(axis=1).sum(1))
    assert before.min() <= 14 and before.max() >= 28  # real nuclei of many sizes
    assert extent.min() >= 22 and extent.max() <= 26  # 24, give or take the fringe
    assert torch.equal(fit_nuclei(torch.ones(2, 3, 32, 32), 24), torch.ones(2, 3, 32, 32))
    assert torch.equal(prepare_batch(torch.from_numpy(crops[:8]), nucleus_px=24),
                       fitted[:8])


def test_a_model_trained_on_fitted_nuclei_classifies_fitted_nuclei(store, crops, tmp_path):
    config = TINY.model_copy(update={"train": TINY.train.model_copy(
        update={"nucleus_px": 24.0, "size_channel": 0.0})})
    model = load_trained_model(train(store, tmp_path / "m", config, max_iters=2, **RUN))
    assert model.config.train.nucleus_px == 24.0
    with torch.no_grad():
        logits = model.network.q_logits(fit_nuclei(to_unit_range(
            torch.from_numpy(crops[:16])), 24))
    assert np.allclose(model.classify(crops[:16]), torch.softmax(logits, 1).numpy(),
                       atol=1e-5)


def test_the_size_channel_holds_each_real_nucleus_s_size_as_stored(crops, masks):
    """The fourth channel is a constant plane per crop that grows with the nucleus's area
    in the stored crop, even when nucleus_px has scaled every nucleus to one size."""
    x = prepare_batch(torch.from_numpy(crops[:64]), nucleus_px=24, size_channel=0.5)
    assert x.shape == (64, 4, 32, 32)
    assert torch.equal(x[:, :3], prepare_batch(torch.from_numpy(crops[:64]), nucleus_px=24))
    plane = x[:, 3]
    assert torch.equal(plane, plane[:, :1, :1].expand_as(plane))  # constant per crop
    area = masks[:64].sum(axis=(1, 2))
    assert area.min() < 100 and area.max() > 300  # real nuclei of many sizes
    expected = 0.5 * (np.sqrt(area) / 16 - 1)
    assert np.corrcoef(plane[:, 0, 0].numpy(), expected)[0, 1] > 0.99
    assert plane.min() >= -0.5 and plane.max() <= 0.5


def test_a_model_with_the_size_channel_generates_and_classifies_it(store, crops, tmp_path):
    """G's samples have a constant fourth plane, the saved model sees the crops' sizes
    (classify differs between two crops that differ only in the size plane) and the
    generator grid stays RGB."""
    config = TINY.model_copy(update={"train": TINY.train.model_copy(
        update={"nucleus_px": 24.0, "size_channel": 1.0})})
    model = load_trained_model(train(store, tmp_path / "m", config, max_iters=2, **RUN))
    network = model.network
    assert network.channels == 4 and model.config.train.size_channel == 1.0
    with torch.no_grad():
        fake = network.generator(*network.sample_inputs(8, torch.Generator(), "cpu")[::2])
        x = prepare_batch(torch.from_numpy(crops[:16]), nucleus_px=24, size_channel=1.0)
        logits = network.q_logits(x)
        other = network.q_logits(torch.cat([x[:, :3], -x[:, 3:]], dim=1))
    assert fake.shape == (8, 4, 32, 32)
    assert torch.equal(fake[:, 3], fake[:, 3, :1, :1].expand_as(fake[:, 3]))
    assert np.allclose(model.classify(crops[:16]), torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert not torch.allclose(logits, other)
    assert model.generate_grid(2).shape == (2, 5, 32, 32, 3)


@pytest.mark.parametrize("field", ["nucleus_px", "size_channel"])
def test_a_model_saved_before_a_field_existed_reads_with_the_behaviour_of_then(
        store, crops, tmp_path, field):
    """nucleus_px (0: crops as stored) and size_channel (0: three channels) were added
    with other defaults than the behaviour before them: a model trained then (the field
    at 0) whose record lacks the field reads and classifies as it was trained."""
    config = TINY.model_copy(update={"train": TINY.train.model_copy(update={field: 0.0})})
    old = train(store, tmp_path / "old", config, max_iters=1, **RUN)
    meta = json.loads((old / "config.json").read_text())
    meta["config"]["train"].pop(field)
    (old / "config.json").write_text(json.dumps(meta))
    model = load_trained_model(old)
    assert getattr(model.config.train, field) == 0.0
    assert model.classify(crops[:4]).shape == (4, 5)
    assert getattr(TrainConfig(), field) > 0


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


def test_warmed_up_average_spans_the_end_of_a_short_run():
    """The average's decay after n updates is min(decay, (1 + n) / (10 + n)): after 49
    updates with the values 1..49 it is near the last ones (a plain 0.995 average from
    the first value would still be near 6)."""
    update = warmed_up_average(0.995)
    averaged, expected = [torch.zeros(3, dtype=torch.float64)], 0.0
    for n in range(1, 50):
        update(averaged, [torch.full((3,), float(n), dtype=torch.float64)], torch.tensor(n))
        decay = min(0.995, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * n
    assert torch.allclose(averaged[0], torch.full((3,), expected, dtype=torch.float64))
    assert 40 < expected < 49
    # warmed up, the decay is the one asked for
    averaged = [torch.zeros(1, dtype=torch.float64)]
    update(averaged, [torch.ones(1, dtype=torch.float64)], torch.tensor(10_000))
    assert averaged[0].item() == pytest.approx(0.005)


def test_averaged_run_keeps_the_moving_average_and_resumes_it(store, trained, tmp_path):
    """With ``average_decay`` the saved model is the exponential moving average of the
    trained networks (not the last iteration's, which the checkpoint keeps), and a run
    resumed from a checkpoint ends with the same average as an uninterrupted one."""
    config = TINY.model_copy(update={"train": TINY.train.model_copy(
        update={"average_decay": 0.5})})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(store, whole, config, max_iters=4, **RUN)
    train(store, parts, config, max_iters=2, **RUN)
    train(store, parts, config, max_iters=4, resume=True, **RUN)
    kept = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(parts / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(kept[k], resumed[k]) for k in kept)
    # the same training as TINY's run (no average: the average does not touch the
    # training): its last networks are the checkpoint's, not the kept ones
    last = torch.load(trained / "checkpoint.pt", weights_only=True)["model"]
    checkpoint = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(last[k], checkpoint["model"][k]) for k in last)
    assert not all(torch.equal(last[k], kept[k]) for k in last)
    average = {k.removeprefix("module."): v for k, v in checkpoint["average"].items()}
    assert all(torch.equal(average[k], kept[k]) for k in kept)
    assert checkpoint["average"]["n_averaged"].item() == 4
    assert load_trained_model(whole).config.train.average_decay == 0.5


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
        "16", "--critic-steps", "2", "--max-iters", "5", "--workers", "0", "--device", "cpu",
        "--quiet", "--stain-augment", "0.05", "--threads", "1"])
    assert result.exit_code == 0, result.output
    # what will run, before it runs; the estimate after the first timed iterations
    first, second = result.stderr.splitlines()[:2]
    assert first.startswith("train: cpu, 1 thread(s), "), first
    assert "width 8, 557 crops, iterations 1-5 of 5 (--max-iters)" in first, first
    assert re.fullmatch(r"estimate: \S+ s per iteration, 1 iterations to go: about \d+ s",
                        second), second
    model = load_trained_model(tmp_path / "m")
    assert model.config.train.critic_steps == 2 and model.config.train.stain_augment == 0.05


@pytest.mark.skipif(not cpu_supports_bfloat16(), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("step", ["critic", "generator", "info"])
def test_bf16_autocast_matches_float32_within_bf16_rounding(crops, step):
    """Each step from the same state and the same random draws, under bf16 autocast (the
    CPU default here) and in float32: the losses agree to 2% and the gradients to 10%
    (relative L2 error; bfloat16 keeps 8 significant bits, 0.4% per rounding, through some
    20 layers forward and back), their cosine >= 0.99; the parameters stay float32."""
    real = prepare_batch(torch.from_numpy(crops[:16]), torch.Generator().manual_seed(0), True)
    results = {}
    for amp in (False, True):
        config = TINY.model_copy(update={"train": TINY.train.model_copy(update={"amp": amp})})
        trainer = Trainer(build_model(5, 32, 8, seed=0), config, torch.device("cpu"))
        assert trainer.bfloat16 is amp
        run = {"critic": lambda: trainer.critic_step(real)[1], "generator":
               trainer.generator_step, "info": lambda: trainer.info_step(real)}[step]
        loss = run()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        grads = torch.cat([p.grad.flatten() for p in trainer.groups[step] if p.grad is not None])
        results[amp] = loss.item(), grads
    (loss32, grad32), (loss16, grad16) = results[False], results[True]
    assert loss16 != loss32  # bf16 really ran
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert ((grad16 - grad32).norm() / grad32.norm()).item() <= 0.10
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0).item() >= 0.99


def test_amp_auto_means_bf16_on_a_bf16_cpu_and_float32_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert uses_bfloat16(None, cpu) is cpu_supports_bfloat16()
    assert uses_bfloat16(None, gpu) is False
    assert uses_bfloat16(True, gpu) is True and uses_bfloat16(False, cpu) is False
    assert 1 <= free_cpu_threads() <= len(os.sched_getaffinity(0))


def test_max_minutes_stops_at_the_budget_with_a_complete_model_dir(store, tmp_path, crops):
    """A 3-second budget on a run of 1,000 iterations: it stops early, says why, and leaves
    a model that loads, classifies and resumes."""
    config = TINY.model_copy(update={"train": TINY.train.model_copy(update={"epochs": 1000})})
    out = train(store, tmp_path / "model", config, max_iters=1000, max_minutes=0.05,
                **{**RUN, "checkpoint_every": 1000, "sample_every": 1000})
    meta = json.loads((out / "config.json").read_text())
    assert meta["stop_reason"] == "max_minutes" and 1 <= meta["iterations"] < 1000
    assert meta["epochs_iterations"] > 1000 and meta["precision"] and meta["device"] == "cpu"
    assert 0 < meta["wall_s"] < 3 + 30  # the budget, one iteration and the final writes
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, meta["iterations"] + 1))
    assert "occupancy" in rows[-1]  # the last iteration gets the end-of-run watch
    model = load_trained_model(out)
    assert model.training["stop_reason"] == "max_minutes"
    assert model.classify(crops[:8]).shape == (8, 5)
    caveat = training_caveat(model.training, rows)
    assert caveat and "stopped by --max-minutes" in caveat
    table = dict(training_run_table(model.training).values.tolist())
    assert table["iterations trained"].startswith(f"{meta['iterations']:,} (")
    assert table["stopped by"].startswith("--max-minutes")
    resumed = train(store, out, config, max_iters=meta["iterations"] + 1, resume=True, **RUN)
    assert json.loads((resumed / "config.json").read_text())["iterations"] == \
        meta["iterations"] + 1


def test_the_estimate_gives_a_cpu_user_a_run_that_fits_an_hour():
    line = estimate_line(40.0, 1000, "cpu", 128, None)
    assert line.startswith("estimate: 40 s per iteration, 1000 iterations to go: about 11 h")
    assert "hint: about 90 iterations fit in one hour at width 128" in line
    assert "--max-iters 90 or --max-minutes 60" in line and "--width 32" in line
    budgeted = estimate_line(40.0, 1000, "cpu", 128, 600.0)
    assert "--max-minutes stops it after about 15 more iterations" in budgeted
    assert "hint" not in budgeted  # the budget already fits the hour
    assert "hint" not in estimate_line(0.5, 1000, "cpu", 16, None)  # 8 minutes
    assert "hint" not in estimate_line(40.0, 1000, "cuda", 128, None)


def test_v_trend_tells_rising_from_levelled_curves():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.5, 400)
    assert value_trend(np.linspace(0, 10, 400) + noise) == "rising"
    assert value_trend(np.minimum(np.linspace(0, 20, 400), 5) + noise) == "levelled"
    assert value_trend(np.linspace(10, 0, 400) + noise) == "falling"
    assert value_trend(np.arange(5.0)) == "too short"
    rows = [{"V": v} for v in np.linspace(0, 10, 400)]
    assert "still rising" in training_caveat({"stop_reason": "epochs"}, rows)
    assert training_caveat({"stop_reason": "epochs", "iterations": 9, "epochs_iterations": 9},
                           [{"V": 1.0}] * 400) is None


def test_sigint_mid_run_writes_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(
        store, tmp_path):
    """``wsicell train`` in a subprocess gets SIGINT once it has logged an iteration: it
    finishes that iteration, writes checkpoint.pt (no model.pt), prints one line naming it
    and exits 130; resumed for two more iterations it ends with the weights and losses of
    one uninterrupted run of as many iterations."""
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "wsicell.cli.main", "train", "--store", str(store),
               "--out", str(out), "--width", "8", "--batch-size", "16", "--critic-steps", "2",
               "--shuffle-buffer", "64", "--max-iters", "100000", "--workers", "0",
               "--device", "cpu", "--threads", "1", "--quiet"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().strip()) and process.poll() is None:
        assert time.monotonic() < deadline, "no iteration logged in 5 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert str(out / "checkpoint.pt") in last_line and "--resume" in last_line, stderr
    assert stderr.splitlines()[0].startswith("train: cpu, 1 thread(s)")
    assert (out / "checkpoint.pt").is_file() and not (out / "model.pt").exists()
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    assert stopped >= 1

    total = stopped + 2
    train(store, out, TINY, max_iters=total, resume=True, **RUN)
    whole = train(store, tmp_path / "whole", TINY, max_iters=total, **RUN)
    parts_state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    whole_state = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(whole_state[k], parts_state[k]) for k in whole_state)

    def losses(path):
        return [{k: v for k, v in json.loads(line).items() if k in ("iteration", "V", "L_D",
                                                                      "L_G", "L_Q")}
                for line in (path / "log.jsonl").read_text().splitlines()]
    assert losses(out) == losses(whole)


def test_the_q_step_has_its_own_learning_rate():
    config = WsicellConfig(train=TrainConfig(width=8, lr=1e-4, lr_info=1e-3))
    trainer = Trainer(build_model(5, 32, 8, seed=0), config, torch.device("cpu"))
    rates = {name: {g["lr"] for g in opt.param_groups} for name, opt in trainer.optimizers.items()}
    assert rates == {"critic": {1e-4}, "generator": {1e-4}, "info": {1e-3}}
