"""The networks of method section 2: a ResNet generator G, a ResNet critic trunk D with a
linear critic head and a linear categorical Q head (InfoGAN), for 32x32 RGB images in [-1, 1].

The architecture is the CIFAR-style ResNet of the WGAN-GP paper (Gulrajani et al. 2017),
with the number of channels (``width``, 128 in the paper) configurable so that small models
train on a CPU:

* G: linear ``k + noise_dim -> width x 4 x 4``; three up residual blocks (batch norm, ReLU,
  nearest-neighbour upsampling, 3x3 convolutions; 4 -> 8 -> 16 -> 32 px); batch norm, ReLU,
  3x3 convolution to RGB and ``tanh``.
* D trunk: an optimised first down block (32 -> 16 px), one down block (16 -> 8 px), two plain
  blocks (mean-pool downsampling, no normalisation), ReLU and global average pooling to
  ``width`` features.  Critic head: linear ``width -> 1``.  Q head: linear ``width -> k``
  (logits; softmax gives the cluster probabilities).

Computed, not changed: each "upsample, then 3x3 convolution" is one stride-2 transposed 4x4
convolution (:func:`upsample_conv`), each "3x3 convolution, then mean pool" one stride-2
4x4 convolution (:func:`conv_mean_pool`), and the 1x1 shortcuts run on the small side of
an upsampling or a pooling: the same functions of the same parameters (equal to rounding;
the parameters and the state dict are unchanged), with about half the multiply-adds (1.5x
the training iterations per second at width 32 on one CPU thread).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CROP_SIZE = 32


def mean_pool(x: torch.Tensor) -> torch.Tensor:
    """Average-pool by 2 in both directions, (B, C, H, W) -> (B, C, H/2, W/2)."""
    return F.avg_pool2d(x, 2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling by 2, (B, C, H, W) -> (B, C, 2H, 2W)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _box_sum(weight: torch.Tensor) -> torch.Tensor:
    """The mean of a 3x3 kernel's four shifts by 0/1 pixel, (O, I, 3, 3) -> (O, I, 4, 4)."""
    return F.avg_pool2d(F.pad(weight, (1, 1, 1, 1)), 2, stride=1)


def conv_mean_pool(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``mean_pool(conv(x))`` for a 3x3, padding-1 ``conv``, computed as one 4x4 convolution
    of stride 2 (the 3x3 kernel averaged over the pool's four shifts): the same linear map
    and parameters, 16/36 of the multiply-adds and no full-resolution intermediate."""
    return F.conv2d(x, _box_sum(conv.weight), conv.bias, stride=2, padding=1)


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(upsample(x))`` for a 3x3, padding-1 ``conv``, computed as one 4x4 transposed
    convolution of stride 2 on ``x`` (the kernel summed over the four shifts of each
    upsampled pixel): the same linear map and parameters, 16/36 of the multiply-adds."""
    kernel = (4 * _box_sum(conv.weight)).flip(2, 3).transpose(0, 1)
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)


class GeneratorBlock(nn.Module):
    """Up residual block of G: BN-ReLU-upsample-conv3-BN-ReLU-conv3, shortcut upsample-conv1."""

    def __init__(self, width: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.shortcut = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = upsample_conv(self.conv1, F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        # a 1x1 convolution commutes with nearest upsampling: convolve the small image
        return upsample(self.shortcut(x)) + h


class Generator(nn.Module):
    """G(z, c): noise (B, noise_dim) and one-hot code (B, k) -> images (B, C, 32, 32) in
    [-1, 1]: RGB, then (``size_channel``) a constant plane, the mean of a fourth output."""

    def __init__(self, categories: int, noise_dim: int, width: int, size_channel: bool = False):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(categories + noise_dim, width * 4 * 4)
        self.blocks = nn.Sequential(*(GeneratorBlock(width) for _ in range(3)))
        self.bn = nn.BatchNorm2d(width)
        self.to_rgb = nn.Conv2d(width, 3 + int(size_channel), 3, padding=1)

    def forward(self, z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        h = self.linear(torch.cat([code, z], dim=1)).view(-1, self.width, 4, 4)
        h = F.relu(self.bn(self.blocks(h)))
        images = torch.tanh(self.to_rgb(h))
        if images.shape[1] == 3:
            return images
        size = images[:, 3:].mean(dim=(2, 3), keepdim=True).expand_as(images[:, 3:])
        return torch.cat([images[:, :3], size], dim=1)


class OptimizedDownBlock(nn.Module):
    """First block of D: conv3-ReLU-conv3-meanpool, shortcut meanpool-conv1 (no ReLU on input)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = conv_mean_pool(self.conv2, F.relu(self.conv1(x)))
        return self.shortcut(mean_pool(x)) + h


class CriticBlock(nn.Module):
    """Residual block of D: ReLU-conv3-ReLU-conv3 (+ mean pool when ``down``), no normalisation."""

    def __init__(self, width: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.shortcut = nn.Conv2d(width, width, 1) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(F.relu(x)))
        if not self.down:
            return x + self.conv2(h)
        # mean pooling commutes with the 1x1 shortcut: pool first
        return self.shortcut(mean_pool(x)) + conv_mean_pool(self.conv2, h)


class CriticTrunk(nn.Module):
    """D's shared trunk: images (B, C, 32, 32) -> features (B, width)."""

    def __init__(self, width: int, in_channels: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([
            OptimizedDownBlock(in_channels, width),
            CriticBlock(width, down=True),
            CriticBlock(width, down=False),
            CriticBlock(width, down=False),
        ])

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after each residual block: (B, width, 16, 16), then 3x (B, width, 8, 8)."""
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.block_outputs(x)[-1]).mean(dim=(2, 3))


class InfoWGAN(nn.Module):
    """G, the critic trunk and its two heads, as one module (one state dict).

    Beyond the paper, ``continuous`` codes (InfoGAN's, Chen et al. 2016) can join the
    categorical one: G takes ``m`` more inputs ``u ~ U(-1, 1)`` after the one-hot code, and
    the Q head has ``m`` more outputs that estimate them, so that continuous variation
    (a nucleus's size, its stain) has somewhere to go other than the categories.  With
    ``continuous=0`` (the paper) the networks are exactly the paper's.

    With ``size_channel``, also beyond the paper, the images have a fourth channel: a
    constant plane holding the nucleus's measured size
    (:func:`wsicell.learning.augment.size_plane`) for real crops, one that G generates
    beside its RGB image for its samples; the critic and Q see both, so G's categories can
    use a size that the crops themselves no longer show (``nucleus_px``).
    """

    def __init__(self, categories: int, noise_dim: int, width: int, continuous: int = 0,
                 size_channel: bool = False):
        super().__init__()
        self.categories = categories
        self.continuous = continuous
        self.noise_dim = noise_dim
        self.channels = 3 + int(size_channel)
        # G's code input is the one-hot category followed by the continuous codes
        self.generator = Generator(categories + continuous, noise_dim, width, size_channel)
        self.trunk = CriticTrunk(width, self.channels)
        self.critic_head = nn.Linear(width, 1)
        self.q_head = nn.Linear(width, categories + continuous)

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        """D(x): images (B, C, 32, 32) -> critic values (B,)."""
        return self.critic_head(self.trunk(x)).squeeze(1)

    def q_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The Q head's outputs, (B, C, 32, 32) -> (B, k + m): the logits over the k
        categories, then the estimates of the m continuous codes."""
        return self.q_head(self.trunk(x))

    def q_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Q's logits over the k categories, (B, C, 32, 32) -> (B, k)."""
        return self.q_outputs(x)[:, :self.categories]

    def discriminator_features(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's D features: each block's activations max-pooled to 4x4, concatenated.

        Parameters
        ----------
        x : Tensor, shape (B, C, 32, 32), float in [-1, 1]

        Returns
        -------
        Tensor, shape (B, 4 * width * 16)  (8192 for the paper's width 128)
        """
        pooled = [F.adaptive_max_pool2d(h, 4).flatten(1) for h in self.trunk.block_outputs(x)]
        return torch.cat(pooled, dim=1)

    def sample_inputs(self, batch: int, generator: torch.Generator, device) -> tuple:
        """Draw noise z ~ N(0, I) (B, noise_dim), categories c (B,) uniform and G's code
        input (B, k + m): c one-hot, then the continuous codes ~ U(-1, 1) (drawn only when
        m > 0, so the paper's model draws what it always drew)."""
        z = torch.randn(batch, self.noise_dim, generator=generator, device=device)
        c = torch.randint(0, self.categories, (batch,), generator=generator, device=device)
        code = F.one_hot(c, self.categories).to(z.dtype)
        if self.continuous:
            u = torch.rand(batch, self.continuous, generator=generator, device=device)
            code = torch.cat([code, 2 * u - 1], dim=1)
        return z, c, code

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters stepped by each optimiser: the critic (trunk + critic head), G, and the
        information step (G + Q, where Q is the shared trunk with the Q head, as in the
        research code)."""
        generator, trunk = list(self.generator.parameters()), list(self.trunk.parameters())
        return {
            "critic": trunk + list(self.critic_head.parameters()),
            "generator": generator,
            "info": generator + trunk + list(self.q_head.parameters()),
        }


def init_gain(module: nn.Module, model: nn.Module) -> float:
    """Xavier gain of a layer as in the WGAN-GP reference code: sqrt(2) ("he_init") for 3x3
    convolutions, 1 for 1x1 shortcut convolutions, linear layers and G's output convolution."""
    is_output = getattr(model, "generator", None) is not None and module is model.generator.to_rgb
    if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and not is_output:
        return 2 ** 0.5
    return 1.0


def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Initialise every convolution and linear layer in place: uniform weights of standard
    deviation ``gain * sqrt(2 / (fan_in + fan_out))`` (:func:`init_gain`) and zero biases,
    the initialisation of the WGAN-GP reference code; batch norm scales 1, shifts 0.

    Returns the number of layers initialised, so callers (and tests) can tell that the
    initialisation did reach the layers (the pitfall of the ported code: one that silently
    did nothing).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight, gain=init_gain(module, model),
                                    generator=generator)
            nn.init.zeros_(module.bias)
            count += 1
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            count += 1
    return count


def build_model(categories: int, noise_dim: int, width: int, seed: int,
                continuous: int = 0, size_channel: bool = False) -> InfoWGAN:
    """A freshly initialised :class:`InfoWGAN` (deterministic for a given seed)."""
    model = InfoWGAN(categories, noise_dim, width, continuous, size_channel)
    init_weights(model, torch.Generator().manual_seed(seed))
    return model


def model_for(train, seed: int | None = None) -> InfoWGAN:
    """A freshly initialised :class:`InfoWGAN` of a training configuration.

    Parameters
    ----------
    train : wsicell.config.TrainConfig
        Its ``categories``, ``noise_dim``, ``width``, ``continuous_codes`` and
        ``size_channel`` (> 0: four input channels) give the networks.
    seed : int, optional
        Initialisation seed (default: ``train.seed``).

    Examples
    --------
    >>> from wsicell.config import TrainConfig
    >>> model_for(TrainConfig(width=8, size_channel=0.0)).channels
    3
    """
    return build_model(train.categories, train.noise_dim, train.width,
                       train.seed if seed is None else seed, train.continuous_codes,
                       train.size_channel > 0)


def generator_grid(model: InfoWGAN, n_rows: int, seed: int = 0) -> np.ndarray:
    """G's samples for ``n_rows`` fixed noise vectors and every category (eval mode), the
    continuous codes, if any, at 0 (their middle).

    Returns
    -------
    ndarray, shape (n_rows, k, 32, 32, 3), uint8: row i = noise z_i, column j = category j.
    """
    device = next(model.parameters()).device
    z = torch.randn(n_rows, model.noise_dim, generator=torch.Generator().manual_seed(seed))
    z = z.to(device).repeat_interleave(model.categories, dim=0)
    codes = F.pad(torch.eye(model.categories, device=device), (0, model.continuous))
    codes = codes.repeat(n_rows, 1)
    was_training = model.generator.training
    model.generator.eval()
    with torch.no_grad():
        images = model.generator(z, codes)[:, :3].float()
    model.generator.train(was_training)
    images = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).reshape(n_rows, model.categories, CROP_SIZE, CROP_SIZE,
                                                3).cpu().numpy()
