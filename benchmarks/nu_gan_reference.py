"""The seed project's own training loop, ported to current torch: the speed reference of
``bench_train.py``.

Not product code: nothing in the ``wsicell`` package imports it (like ``htk_reference.py``).

Source read: github.com/bohu615/nu_gan (Hu et al. 2018, "Unsupervised learning for cell-level
visual representation in histopathology images with generative adversarial networks"),

* ``utils/gan_model.py`` at commit 2a7b3a46823abf57d6b3240cc235310951a39eff: the networks
  (``avgpool``, ``ResidualBlock``, ``ResidualBlock_thefirstone``, ``generator``,
  ``discriminator``, ``_netD_D``, ``_netD_Q``), ``weights_init``, ``sample_c``,
  ``calc_gradient_penalty`` and ``train_representation``;
* ``nu_gan.py`` at the same commit for the defaults (rand 32, dis 1, dis_category 5,
  learning rates 1e-4) and ``utils/networks_gan.py`` at 08dd9f603c3e51d832a9993b430288569deb1aa4
  (the same networks; batch size 64 in that version's ``nu_gan.py``).

Reimplemented here, not copied. Kept as the research code has it:

* the layer structure, the attribute names (so the state dicts have nu_gan's keys) and the op
  order of every block: the strided-slice mean pool (four slices, three additions, a
  division), G's up block ``bn1-ReLU-conv1`` at the input resolution, then
  ``bn2-ReLU-upsample-conv2`` (shortcut upsample-conv1x1), the critic's down block
  ``ReLU-conv1-ReLU-conv2-meanpool`` (shortcut conv1x1-meanpool), the first block
  ``conv1-ReLU-conv2-meanpool`` (shortcut meanpool-conv1x1), ``x.mean(2).mean(2)``, the
  heads' ``view`` calls and Q's log-softmax with the negative log-likelihood loss;
* one iteration of ``train_representation``: ``requires_grad`` switched on for D and the
  critic head, then 5 critic steps, each ``zero_grad`` of all four networks, the real critic
  term back-propagated with ``-1``, G run without gradients, the fake term back-propagated
  with ``+1``, the gradient penalty (``lambda`` 10, interpolation weights drawn on the host,
  ``create_graph=True``) back-propagated on its own, and one Adam step of D + critic head;
  then ``requires_grad`` off, the G step (``-E[D(G(z, c))]`` seeded with ``-1``, Adam on G),
  ``requires_grad`` on again and the Q step on the *same* noise as the G step (G run again,
  ``NLLLoss`` times ``discrete_lamda`` 1, Adam on G + D + Q head); three Adam optimisers
  with betas (0.5, 0.9) and learning rate 1e-4, parameter groups as in the original;
* the categorical code drawn on the host with numpy's multinomial and copied to the device,
  ``z`` drawn on the device; the initialisation of ``weights_init`` (uniform weights of
  standard deviation ``sqrt(4 / (fan_in + fan_out))`` for 3x3 convolutions, ``sqrt(2 / ...)``
  for 1x1 convolutions and linear layers, zero biases, batch-norm scales ``N(1, 0.02)``).

Changed to run on current torch (2.x):

* no ``Variable``: ``volatile=True`` becomes ``torch.no_grad()``, ``Variable(x.data)``
  becomes the tensor itself (already detached), ``requires_grad=True`` is ``requires_grad_``;
* ``backward(one)`` / ``backward(mone)`` seed with 0-dim tensors (the losses are 0-dim now;
  a shape-(1,) seed is an error); ``dataiter.next()`` is ``next(batches)``;
* ``nn.Upsample(up_size, 2)`` passed both a size and a scale factor, which current torch
  rejects: here ``nn.Upsample(size=up_size)`` (nearest, the same result); ``nn.LogSoftmax()``
  gets its implicit ``dim=1``;
* ``Module.zero_grad()`` keeps current torch's default (gradients set to ``None``, where
  torch 0.3 zeroed them in place);
* the preallocated ``input`` / ``c`` / ``z`` buffers filled with ``resize_as_().copy_()``
  are plain tensors; the host ``sample_c`` draws the whole batch in one multinomial call
  (same distribution) instead of one call per row; the initialisation draws from a seeded
  ``torch.Generator`` instead of numpy's global state; ``.cuda()`` is ``.to(device)``;
* logging, picture saving, evaluation and checkpoints (every 10 / 100 iterations in the
  original) and the unused ``optimizerQ_G`` and BCE / MSE criteria are left out.

The channel count (``width``) is a parameter: nu_gan hard-codes 128 (``2048 = 128 x 4 x 4``
in G's linear layer, ``128`` features in the heads); ``bench_train.py`` passes wsicell's
``--width`` so that the two are compared at the same width.

Structural differences from wsicell's :mod:`wsicell.learning.model` and
:mod:`wsicell.learning.trainer` (the same method, not the same arithmetic):

* wsicell's up block upsamples *before* its first 3x3 convolution, as the WGAN-GP ResNet
  does (nu_gan convolves first, at the low resolution): written out plainly that is about 8%
  more FLOPs per iteration than nu_gan; wsicell computes each upsample-then-3x3 as one
  stride-2 transposed 4x4 convolution and each 3x3-then-mean-pool as one stride-2 4x4
  convolution, the same functions of the same parameters with 16/36 of the multiply-adds;
* wsicell scores real and fake crops in one batched critic pass and back-propagates the
  critic loss once (nu_gan: three forward and three backward passes per critic step),
  draws fresh noise for its Q step, and by default adds the ``lambda_marginal`` term, a Q
  pass over two random symmetries of the real batch (128 more crops through the trunk);
* the issue counted ~4,109 device ops per nu_gan iteration and about half that for wsicell;
  counted at torch's dispatcher on the CPU (every aten call, views included) it is 7,011
  for this port and 5,064 for wsicell's default iteration.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class AvgPool(nn.Module):
    """nu_gan's ``avgpool``: the mean of the four strided 2x2 sub-grids, (B, C, H, W) ->
    (B, C, H/2, W/2), written out as slices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :, ::2, ::2] + x[:, :, 1::2, ::2] + x[:, :, ::2, 1::2]
                + x[:, :, 1::2, 1::2]) / 4


class UpBlock(nn.Module):
    """``ResidualBlock(resample='up')``: BN-ReLU-conv3, BN-ReLU-upsample-conv3; shortcut
    upsample-conv1."""

    def __init__(self, width: int, up_size: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1)
        self.upsample = nn.Upsample(size=up_size)
        self.upsample_conv = nn.Conv2d(width, width, 1, 1, 0)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.upsample_conv(self.upsample(x))
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(self.upsample(F.relu(self.bn2(out))))
        return out + shortcut


class DownBlock(nn.Module):
    """``ResidualBlock(resample='down')``: ReLU-conv3-ReLU-conv3-meanpool; shortcut
    conv1-meanpool."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1)
        self.pool = AvgPool()
        self.pool_conv = nn.Conv2d(width, width, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.pool(self.pool_conv(x))
        out = self.conv1(F.relu(x))
        out = self.pool(self.conv2(F.relu(out)))
        return out + shortcut


class PlainBlock(nn.Module):
    """``ResidualBlock(resample=None)``: ReLU-conv3-ReLU-conv3; identity shortcut."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return out + x


class FirstBlock(nn.Module):
    """``ResidualBlock_thefirstone``: conv3-ReLU-conv3-meanpool; shortcut meanpool-conv1."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1)
        self.pool = AvgPool()
        self.pool_conv = nn.Conv2d(in_channels, width, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.pool_conv(self.pool(x))
        out = self.pool(self.conv2(F.relu(self.conv1(x))))
        return out + shortcut


class NuGanGenerator(nn.Module):
    """nu_gan's ``generator``: noise (B, rand, 1, 1) -> images (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self, rand: int, width: int = 128):
        super().__init__()
        self.rand, self.width = rand, width
        self.linear = nn.Linear(rand, width * 4 * 4)
        self.layer_up_1 = UpBlock(width, 8)
        self.layer_up_2 = UpBlock(width, 16)
        self.layer_up_3 = UpBlock(width, 32)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv_last = nn.Conv2d(width, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.view(-1, self.rand)).view(-1, self.width, 4, 4)
        x = self.layer_up_3(self.layer_up_2(self.layer_up_1(x)))
        return torch.tanh(self.conv_last(F.relu(self.bn1(x))))


class NuGanDiscriminator(nn.Module):
    """nu_gan's ``discriminator`` (the shared trunk): images -> features (B, width)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.layer_down_1 = FirstBlock(3, width)
        self.layer_down_2 = DownBlock(width)
        self.layer_none_1 = PlainBlock(width)
        self.layer_none_2 = PlainBlock(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_none_2(self.layer_none_1(self.layer_down_2(self.layer_down_1(x))))
        return F.relu(x).mean(2).mean(2)


class CriticHead(nn.Module):
    """nu_gan's ``_netD_D``: features (B, width) -> critic values (B, 1, 1, 1)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(-1, self.width)).view(-1, 1, 1, 1)


class QHead(nn.Module):
    """nu_gan's ``_netD_Q``: features (B, width) -> log-probabilities (B, nd, 1, 1)."""

    def __init__(self, nd: int, width: int = 128):
        super().__init__()
        self.width, self.nd = width, nd
        self.linear = nn.Linear(width, nd)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.linear(x.view(-1, self.width))).view(-1, self.nd, 1, 1)


def _uniform_std_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` from ``U(-std * sqrt(3), std * sqrt(3))`` (standard deviation ``std``)."""
    bound = std * 3 ** 0.5
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """nu_gan's ``weights_init`` for one module (use with ``net.apply``)."""
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0]
        fan_in = module.in_channels * k ** 2
        fan_out = module.out_channels * k ** 2 / module.stride[0] ** 2
        gain = 4.0 if k == 3 else 2.0
        _uniform_std_(module.weight, (gain / (fan_in + fan_out)) ** 0.5, generator)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        with torch.no_grad():
            module.weight.normal_(1.0, 0.02, generator=generator)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        std = (2.0 / (module.in_features + module.out_features)) ** 0.5
        _uniform_std_(module.weight, std, generator)
        nn.init.zeros_(module.bias)


class NuGanReference:
    """nu_gan's four networks, its three optimisers and one ``train_representation``
    iteration.

    Parameters
    ----------
    width : int
        Channels of the residual networks (nu_gan: 128).
    rand : int
        Dimension of the Gaussian noise z (nu_gan's ``rand``, 32).
    dis_category : int
        Categories k of the code c (nu_gan's ``dis_category``, 5; ``dis`` is 1).
    batch_size : int
        Crops per batch (64).
    device : torch.device or str
    seed : int
        Seeds the initialisation and the host and device noise.
    """

    critic_steps = 5
    lamda = 10.0
    discrete_lamda = 1.0

    def __init__(self, width: int = 128, rand: int = 32, dis_category: int = 5,
                 batch_size: int = 64, device: torch.device | str = "cpu", seed: int = 0,
                 lr: float = 1e-4):
        self.device = torch.device(device)
        self.rand, self.dis_category, self.batch_size = rand, dis_category, batch_size
        init = torch.Generator().manual_seed(seed)
        self.netD = NuGanDiscriminator(width)
        self.netG = NuGanGenerator(rand + dis_category, width)
        self.netD_D = CriticHead(width)
        self.netD_Q = QHead(dis_category, width)
        for net in self.nets:
            net.apply(lambda m: init_weights(m, init))
            net.to(self.device)
        betas = (0.5, 0.9)
        self.optimizerD = torch.optim.Adam([
            {"params": self.netD.parameters(), "lr": lr},
            {"params": self.netD_D.parameters(), "lr": lr},
        ], betas=betas)
        self.optimizerG = torch.optim.Adam([{"params": self.netG.parameters(), "lr": lr}],
                                           betas=betas)
        self.optimizerQ = torch.optim.Adam([
            {"params": self.netG.parameters()},
            {"params": self.netD.parameters()},
            {"params": self.netD_Q.parameters()},
        ], lr, betas=betas)
        self.criterion_logli = nn.NLLLoss()
        self.one = torch.tensor(1.0, device=self.device)
        self.mone = self.one * -1
        self.host_rng = np.random.default_rng(seed)
        self.device_rng = torch.Generator(self.device).manual_seed(seed)

    @property
    def nets(self) -> tuple[nn.Module, ...]:
        """(D trunk, G, critic head, Q head)."""
        return self.netD, self.netG, self.netD_D, self.netD_Q

    def zero_grad(self) -> None:
        """``zero_grad`` of all four networks, as the research code does before each step."""
        for net in self.nets:
            net.zero_grad()

    def _set_critic_grad(self, flag: bool) -> None:
        for net in (self.netD, self.netD_D):
            for p in net.parameters():
                p.requires_grad = flag

    def sample_c(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot codes (B, k) and their labels (B,), drawn on the host (``sample_c``)."""
        rand_c = self.host_rng.multinomial(1, [1 / self.dis_category] * self.dis_category,
                                           size=batch).astype(np.float32)
        label_c = torch.from_numpy(rand_c.argmax(axis=1).astype(np.int64))
        return torch.from_numpy(rand_c), label_c

    def noise(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """G's input ``cat([c, z])`` (B, k + rand, 1, 1) on the device, and c's labels."""
        rand_c, label_c = self.sample_c(batch)
        c = rand_c.to(self.device).view(-1, self.dis_category, 1, 1)
        z = torch.empty(batch, self.rand, 1, 1, device=self.device).normal_(
            0, 1, generator=self.device_rng)
        noise = torch.cat([c, z], 1)
        return noise.view(batch, self.rand + self.dis_category, 1, 1), label_c

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """``calc_gradient_penalty``: ``lamda * E[(||grad D(x_hat)||_2 - 1)^2]``."""
        batch = real.shape[0]
        alpha = torch.rand(batch, 1, 1, 1).expand(real.size()).to(self.device)
        interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        disc_interpolates = self.netD_D(self.netD(interpolates))
        (gradients,) = torch.autograd.grad(disc_interpolates.sum(), interpolates,
                                           create_graph=True)
        return ((gradients.view(batch, -1).norm(2, dim=1) - 1) ** 2).mean() * self.lamda

    def critic_step(self, real: torch.Tensor) -> torch.Tensor:
        """One critic step on a real batch (B, 3, 32, 32) in [-1, 1]; returns
        ``D_cost = -E[D(x)] + E[D(G(z, c))] + penalty``, detached."""
        self.zero_grad()
        real = real.to(self.device)
        err_real = self.netD_D(self.netD(real)).mean()
        err_real.backward(self.mone)
        noise, _ = self.noise(real.shape[0])
        with torch.no_grad():
            fake = self.netG(noise)
        err_fake = self.netD_D(self.netD(fake)).mean()
        err_fake.backward(self.one)
        penalty = self.gradient_penalty(real, fake)
        penalty.backward()
        d_cost = -err_real + err_fake + penalty
        self.optimizerD.step()
        return d_cost.detach()

    def iteration(self, batches) -> torch.Tensor:
        """One ``train_representation`` iteration: 5 critic steps on the next 5 real batches
        of ``batches``, the G step and the Q step -> tensor [D_cost (last critic step),
        errG, mi_loss], detached."""
        self._set_critic_grad(True)
        for _ in range(self.critic_steps):
            d_cost = self.critic_step(next(batches))

        self._set_critic_grad(False)
        self.zero_grad()
        noise, label_c = self.noise(self.batch_size)
        err_g = self.netD_D(self.netD(self.netG(noise))).mean()
        err_g.backward(self.mone)
        self.optimizerG.step()

        self._set_critic_grad(True)
        self.zero_grad()
        q_c_given_x = self.netD_Q(self.netD(self.netG(noise))).view(self.batch_size,
                                                                    self.dis_category)
        mi_loss = self.discrete_lamda * self.criterion_logli(q_c_given_x,
                                                             label_c.to(self.device))
        mi_loss.backward()
        self.optimizerQ.step()
        return torch.stack([d_cost, err_g.detach(), mi_loss.detach()])
