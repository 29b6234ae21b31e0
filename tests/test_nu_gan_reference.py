"""The benchmark's port of nu_gan's training loop (benchmarks/nu_gan_reference.py) builds
and runs: the speed reference of bench_train.py must do the work it claims to."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from nu_gan_reference import NuGanReference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def real_batches(batch, drawn, seed=0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        drawn.append(batch)
        yield torch.rand(batch, 3, 32, 32, generator=generator) * 2 - 1


def test_one_reference_iteration_steps_every_network_with_finite_losses():
    ref = NuGanReference(width=8, batch_size=16)
    assert ref.netG(ref.noise(4)[0]).shape == (4, 3, 32, 32)
    assert ref.netD(torch.zeros(4, 3, 32, 32)).shape == (4, 8)
    # nu_gan's state-dict keys are kept
    assert "layer_up_1.upsample_conv.weight" in ref.netG.state_dict()
    assert "layer_down_1.pool_conv.weight" in ref.netD.state_dict()
    before = [[p.detach().clone() for p in net.parameters()] for net in ref.nets]
    drawn = []
    losses = ref.iteration(real_batches(16, drawn))
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    # mi_loss is a cross entropy over 5 categories: near ln 5 at the start
    assert 0 < losses[2].item() < 3
    for net, old in zip(ref.nets, before):
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), old)), net
    # one real batch per critic step; requires_grad restored for the next iteration
    assert len(drawn) == ref.critic_steps == 5
    assert all(p.requires_grad for net in ref.nets for p in net.parameters())
