"""The networks of method section 2: shapes, tanh, initialisation, features, Q."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsicell.learning.model import (
    InfoWGAN,
    build_model,
    generator_grid,
    init_gain,
    init_weights,
    mean_pool,
    upsample,
)
from wsicell.learning.saved_model import weights_id

K, NOISE, WIDTH = 5, 32, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return build_model(K, NOISE, WIDTH, seed=0)


def images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes(model):
    z, _, onehot = model.sample_inputs(6, torch.Generator().manual_seed(1), "cpu")
    assert model.generator(z, onehot).shape == (6, 3, 32, 32)
    x = images(6)
    assert model.critic(x).shape == (6,)
    assert model.q_logits(x).shape == (6, K)
    assert onehot.sum(dim=1).eq(1).all()


def test_continuous_codes_join_the_category_and_leave_the_paper_s_draws_alone():
    net = build_model(K, NOISE, WIDTH, seed=0, continuous=2)
    z, category, code = net.sample_inputs(64, torch.Generator().manual_seed(1), "cpu")
    assert code.shape == (64, K + 2)
    assert torch.equal(code[:, :K].argmax(dim=1), category) and code[:, :K].sum(1).eq(1).all()
    assert code[:, K:].abs().max() <= 1 and code[:, K:].std() > 0.4  # U(-1, 1)
    assert net.generator(z, code).shape == (64, 3, 32, 32)
    x = images(6)
    assert net.q_outputs(x).shape == (6, K + 2)
    assert torch.equal(net.q_logits(x), net.q_outputs(x)[:, :K])
    # the paper's model (no continuous code) draws exactly what it always drew
    paper = build_model(K, NOISE, WIDTH, seed=0)
    z0, c0, onehot = paper.sample_inputs(64, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(z0, z) and torch.equal(c0, category) and onehot.shape == (64, K)
    assert paper.q_head.out_features == K


def test_generator_ends_with_tanh():
    net = build_model(K, NOISE, WIDTH, seed=0)
    with torch.no_grad():
        net.generator.to_rgb.bias.fill_(100.0)  # a pre-activation of ~100 saturates tanh at 1
    z, _, onehot = net.sample_inputs(4, torch.Generator().manual_seed(0), "cpu")
    out = net.generator(z, onehot)
    assert out.max() <= 1.0 and out.min() > 0.999


def test_init_changes_every_layer_and_has_xavier_statistics():
    torch.manual_seed(0)
    net = InfoWGAN(K, NOISE, WIDTH)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    assert init_weights(net, torch.Generator().manual_seed(0)) == len(layers)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
            bound = init_gain(module, net) * (6 / (fan_in + fan_out)) ** 0.5
            assert weight.abs().max() <= bound
            if weight.numel() > 200:
                assert weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.15)
            assert module.bias.eq(0).all()
    assert init_gain(net.trunk.blocks[1].conv1, net) == 2 ** 0.5
    assert init_gain(net.generator.to_rgb, net) == init_gain(net.q_head, net) == 1.0
    changed = [k for k, v in net.state_dict().items()
               if k.endswith("weight") and not torch.equal(v, before[k])]
    convs = [k for k in before if k.endswith("weight") and before[k].dim() > 1]
    assert set(convs) <= set(changed)


def test_build_is_deterministic():
    a, b = build_model(K, NOISE, WIDTH, seed=3), build_model(K, NOISE, WIDTH, seed=3)
    assert weights_id(a.state_dict()) == weights_id(b.state_dict())
    assert weights_id(a.state_dict()) != weights_id(build_model(K, NOISE, WIDTH, 4).state_dict())


def test_discriminator_features_are_pooled_block_activations(model):
    x = images(3)
    features = model.discriminator_features(x)
    assert features.shape == (3, 4 * WIDTH * 16)
    blocks = model.trunk.block_outputs(x)
    assert [tuple(b.shape[2:]) for b in blocks] == [(16, 16), (8, 8), (8, 8), (8, 8)]
    first = F.max_pool2d(blocks[0], 4).flatten(1)
    assert torch.allclose(features[:, :WIDTH * 16], first)


def test_q_log_probabilities_sum_to_one(model):
    log_p = F.log_softmax(model.q_logits(images(5)), dim=1)
    assert torch.allclose(log_p.exp().sum(dim=1), torch.ones(5), atol=1e-6)


def test_generator_grid_rows_share_noise_columns_share_category(model):
    grid = generator_grid(model, 3, seed=7)
    assert grid.shape == (3, K, 32, 32, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid, generator_grid(model, 3, seed=7))
    assert not np.array_equal(grid[0, 0], grid[0, 1])  # categories differ
    assert not np.array_equal(grid[0, 0], grid[1, 0])  # noise differs
    assert model.generator.training  # the grid leaves the training mode alone


def test_folded_convolutions_equal_the_plain_blocks():
    """The blocks compute upsample-then-conv3 and conv3-then-mean-pool as stride-2 4x4
    convolutions, and the 1x1 shortcuts on the small side: the same functions as the plain
    formulation (float64, to rounding)."""
    torch.manual_seed(0)
    model = build_model(K, NOISE, 8, seed=0).double()
    up = model.generator.blocks[0]
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    h = up.conv1(upsample(F.relu(up.bn1(x))))
    plain = up.shortcut(upsample(x)) + up.conv2(F.relu(up.bn2(h)))
    assert torch.allclose(up(x), plain, rtol=0, atol=1e-12)
    first, down = model.trunk.blocks[0], model.trunk.blocks[1]
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    plain = first.shortcut(mean_pool(x)) + mean_pool(first.conv2(F.relu(first.conv1(x))))
    assert torch.allclose(first(x), plain, rtol=0, atol=1e-12)
    x = torch.randn(3, 8, 16, 16, dtype=torch.float64)
    h = down.conv2(F.relu(down.conv1(F.relu(x))))
    plain = mean_pool(down.shortcut(x)) + mean_pool(h)
    assert torch.allclose(down(x), plain, rtol=0, atol=1e-12)
