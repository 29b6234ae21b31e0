"""The WGAN-GP + InfoGAN updates of method section 2.

One *iteration* is ``critic_steps`` (5) critic steps on real batches, then one generator step
and one Q step, each from freshly drawn noise z and categorical code c:

* critic: ``L_D = E[D(G(z,c))] - E[D(x)] + lambda1 * E[(||grad D(x_hat)||_2 - 1)^2]``, with
  ``x_hat`` uniformly on the lines between real and fake crops (gradient penalty,
  differentiated with ``create_graph=True``; its norm in float32);
  ``V(D,G) = E[D(x)] - E[D(G(z,c))]`` is the critic's estimate of the Wasserstein distance;
* generator: ``L_G = -E[D(G(z,c))]`` (steps G);
* Q: ``L_Q = lambda2 * cross_entropy(Q(G(z,c)), c)`` (steps G and Q = the shared trunk
  with the Q head, as the research code does); beyond the paper, optional terms on Q's
  categories of real crops (``lambda_cluster``, ``lambda_marginal``, ``lambda_confidence``)
  and ``lambda_info * 0.5 * mean squared error`` of Q's estimates of G's continuous codes
  (``continuous_codes``; InfoGAN's Gaussian term with unit variance).

Under ``torchrun`` gradients are averaged across ranks with ``all_reduce`` (NCCL on GPUs,
gloo on CPUs).  The training run itself (store, checkpoints, pictures) is
:func:`wsicell.pipeline.training.train`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from wsicell.config import WsicellConfig
from wsicell.learning.augment import random_dihedral, to_unit_range
from wsicell.learning.device import uses_bfloat16
from wsicell.learning.model import InfoWGAN, model_for

LOSS_NAMES = ("V", "L_D", "L_G", "L_Q")


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator, autocast=None) -> torch.Tensor:
    """WGAN-GP penalty ``E[(||grad_x D(x_hat)||_2 - 1)^2]``.

    ``x_hat``, its gradient and the norm are float32; the critic's pass on ``x_hat`` (and
    so the double backward through it) runs under ``autocast``, as in PyTorch's AMP recipe
    for gradient penalties.

    Parameters
    ----------
    critic : callable
        (B, 3, 32, 32) -> (B,) critic values.
    real, fake : Tensor, shape (B, 3, 32, 32)
    generator : torch.Generator
        Draws the interpolation weights ``eps ~ U(0, 1)``, one per pair.
    autocast : context manager, optional
        Precision of the critic's pass, e.g. ``torch.autocast("cpu", torch.bfloat16)``
        (default: autocast off, float32 throughout, whatever the caller's context).

    Returns
    -------
    Tensor, scalar float32, differentiable with respect to the critic's parameters.

    Examples
    --------
    >>> critic = lambda x: 0.5 * x[:, 0, 0, 0]  # its gradient's norm is 0.5 everywhere
    >>> real, fake = torch.zeros(4, 3, 32, 32), torch.ones(4, 3, 32, 32)
    >>> gradient_penalty(critic, real, fake, torch.Generator()).item()  # (0.5 - 1)^2
    0.25
    """
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=real.device)
    x_hat = (eps * real.float() + (1 - eps) * fake.float()).requires_grad_(True)
    off = torch.autocast(real.device.type, enabled=False)
    with autocast if autocast is not None else off:
        scores = critic(x_hat).float()
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    with off:
        return (grad.float().flatten(1).norm(dim=1) - 1).pow(2).mean()


@contextlib.contextmanager
def frozen(params):
    """Do not compute gradients for ``params`` inside the block (they are not stepped there)."""
    params = list(params)
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Trainer:
    """The networks, their three Adam optimisers and the three update steps.

    The forward passes, the gradient penalty's included, run under bf16 autocast when
    :func:`uses_bfloat16` says so (by default on a CPU with native bfloat16;
    ``self.bfloat16``), the penalty's norm and every loss in float32; on a CPU the networks and batches use the channels-last memory layout
    (``channels_last`` None = on a CPU).  With ``train.average_decay`` it also keeps
    ``self.average``, an exponential moving average of the networks (parameters and
    batch-norm statistics) updated after every iteration; :attr:`final_model` is the
    networks a run keeps.
    """

    def __init__(self, model: InfoWGAN, config: WsicellConfig, device: torch.device,
                 world_size: int = 1, rank: int = 0, compile: bool = False,
                 channels_last: bool | None = None):
        cfg = config.train
        self.model, self.cfg, self.device, self.world_size = model, cfg, device, world_size
        self.groups = model.parameter_groups()
        rates = {"critic": cfg.lr, "generator": cfg.lr, "info": cfg.lr_info}
        self.optimizers = {name: torch.optim.Adam(params, lr=rates[name], betas=tuple(cfg.betas))
                           for name, params in self.groups.items()}
        seed = int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0])
        self.generator = torch.Generator(device).manual_seed(seed)
        self.bfloat16 = uses_bfloat16(cfg.amp, device)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bfloat16)
        # channels-last convolutions are the fast layout of oneDNN on CPUs (networks and
        # batches; default on a CPU; the parameters' values and the state dict are unchanged)
        if channels_last is None:
            channels_last = device.type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        # torch.compile cannot differentiate twice, so the penalty always uses the eager critic.
        wrap = torch.compile if compile else (lambda f: f)
        self.fast_generator = wrap(model.generator)
        self.fast_critic = wrap(model.critic)
        self.fast_q = wrap(model.q_outputs)
        self.average = (AveragedModel(model, multi_avg_fn=warmed_up_average(cfg.average_decay),
                                      use_buffers=True) if cfg.average_decay > 0 else None)

    @property
    def final_model(self) -> InfoWGAN:
        """The networks a run keeps: the moving average when there is one, else the trained
        networks themselves."""
        return self.average.module if self.average is not None else self.model

    def _step(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            grads = [p.grad for p in self.groups[name] if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= self.world_size
            for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(mean.view_as(g))
        optimizer.step()

    def _fake(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G's samples, their categories (B,) and G's whole code input (B, k + m)."""
        z, category, code = self.model.sample_inputs(batch, self.generator, self.device)
        with self.amp:
            return self.fast_generator(z, code), category, code

    def critic_step(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One critic step on a prepared real batch; returns (V(D,G), L_D), detached."""
        batch = real.shape[0]
        real = real.contiguous(memory_format=self.memory_format)
        with torch.no_grad():
            fake = self._fake(batch)[0]
        with self.amp:
            scores = self.fast_critic(torch.cat([real, fake.to(real.dtype)])).float()
        value = scores[:batch].mean() - scores[batch:].mean()
        penalty = gradient_penalty(self.model.critic, real, fake, self.generator, self.amp)
        loss = -value + self.cfg.lambda_gp * penalty
        self._step("critic", loss)
        return value.detach(), loss.detach()

    def generator_step(self) -> torch.Tensor:
        """One generator step, ``L_G = -E[D(G(z, c))]``; returns L_G, detached."""
        with frozen(self.groups["critic"]):
            fake = self._fake(self.cfg.batch_size)[0]
            with self.amp:
                loss = -self.fast_critic(fake).float().mean()
            self._step("generator", loss)
        return loss.detach()

    def info_step(self, real: torch.Tensor) -> torch.Tensor:
        """One Q step, ``L_Q = lambda2 * CE(Q(G(z, c)), c)`` (plus ``lambda2 * 0.5 * MSE``
        of Q's estimates of the continuous codes, when there are any) on G, the trunk and
        the Q head, minus ``lambda_cluster`` times the :func:`invariant_information` of Q
        on two random symmetries of the real batch, minus ``lambda_marginal`` times the
        :func:`marginal_entropy` of Q on them and plus ``lambda_confidence`` times their
        :func:`mean_entropy`, when those weights are set; returns L_Q, detached."""
        cfg = self.cfg
        with frozen(self.model.critic_head.parameters()):
            fake, category, code = self._fake(cfg.batch_size)
            with self.amp:
                outputs = self.fast_q(fake).float()
            k = self.model.categories
            info = F.cross_entropy(outputs[:, :k], category)
            if self.model.continuous:
                info = info + 0.5 * F.mse_loss(outputs[:, k:], code[:, k:].float())
            info = cfg.lambda_info * info
            loss = info
            if cfg.lambda_cluster > 0 or cfg.lambda_marginal > 0 or cfg.lambda_confidence > 0:
                views = torch.cat([random_dihedral(real, self.generator) for _ in range(2)]
                                  ).contiguous(memory_format=self.memory_format)
                with self.amp:
                    view_logits = self.fast_q(views).float()[:, :k]
                loss = (loss - cfg.lambda_cluster * invariant_information(*view_logits.chunk(2))
                        - cfg.lambda_marginal * marginal_entropy(view_logits)
                        + cfg.lambda_confidence * mean_entropy(view_logits))
            self._step("info", loss)
        return info.detach()

    def iteration(self, batches) -> torch.Tensor:
        """critic_steps critic steps, one G step, one Q step (on the last critic batch) ->
        tensor [V, L_D, L_G, L_Q] (V and L_D averaged over the critic steps)."""
        steps = []
        for _ in range(self.cfg.critic_steps):
            real = next(batches)
            steps.append(torch.stack(self.critic_step(real)))
        critic = torch.stack(steps).mean(dim=0)
        losses = torch.cat([critic, torch.stack([self.generator_step(), self.info_step(real)])])
        if self.average is not None:
            self.average.update_parameters(self.model)
        return losses


def warmed_up_average(decay: float):
    """The update of an exponential moving average whose decay warms up with its count.

    After ``n`` updates the average moves towards the current values by ``1 - d`` with
    ``d = min(decay, (1 + n) / (10 + n))`` (the ``num_updates`` rule of TensorFlow's
    ``ExponentialMovingAverage``): early on it follows the networks closely, so a short run's
    average spans about its last tenth instead of reaching back into its first iterations.

    Parameters
    ----------
    decay : float
        The decay once warmed up, in (0, 1); 0.995 spans about the last 200 updates.

    Returns
    -------
    callable
        ``update(averaged, current, n)`` for :class:`torch.optim.swa_utils.AveragedModel`'s
        ``multi_avg_fn``: lists of tensors, ``averaged`` updated in place (integer ones
        rounded towards zero, as torch's own average does); ``n`` the number of updates so
        far (a 0-d tensor).

    Examples
    --------
    >>> update = warmed_up_average(0.995)
    >>> averaged, current = [torch.zeros(2)], [torch.ones(2)]
    >>> update(averaged, current, torch.tensor(1))   # d = 2 / 11
    >>> averaged[0]
    tensor([0.8182, 0.8182])
    """
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               n: torch.Tensor) -> None:
        count = int(n)
        weight = 1.0 - min(decay, (1 + count) / (10 + count))
        for mean, value in zip(averaged, current):
            if mean.is_floating_point():
                mean.lerp_(value, weight)
            else:   # counters, e.g. batch norm's num_batches_tracked
                mean.copy_(mean * (1 - weight) + value * weight)
    return update


def invariant_information(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mutual information between the categories Q gives two views of the same images (IIC).

    Parameters
    ----------
    logits_a, logits_b : Tensor, shape (B, k)
        Q's logits of view a and view b of the same B images.

    Returns
    -------
    Tensor, scalar
        ``I(c_a; c_b)`` in nats, from the symmetrised joint distribution of the two views'
        categories; at most ``ln k``, reached when every image gets one confident category
        in both views and the k categories are used equally.
    """
    joint = torch.softmax(logits_a, dim=1).T @ torch.softmax(logits_b, dim=1)
    joint = ((joint + joint.T) / (2 * logits_a.shape[0])).clamp_min(1e-12)
    marginal = joint.sum(dim=1)
    return (joint * (joint.log() - marginal.log()[:, None] - marginal.log()[None, :])).sum()


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of Q's category distributions over a batch (SCAN's entropy term).

    Parameters
    ----------
    logits : Tensor, shape (B, k)

    Returns
    -------
    Tensor, scalar
        ``H(mean_b softmax(logits_b))`` in nats: ``ln k`` when the batch's cells are spread
        evenly over the k categories, 0 when they all go to one.
    """
    marginal = torch.softmax(logits, dim=1).mean(dim=0).clamp_min(1e-12)
    return -(marginal * marginal.log()).sum()


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over a batch of the entropy of each crop's category distribution.

    Minimised beside :func:`marginal_entropy` maximised, it maximises the mutual information
    between crops and categories (regularised information maximisation, Krause et al.
    2010; IMSAT, Hu et al. 2017): each crop confidently in one category, the categories
    used evenly. The marginal term alone can be met by giving every crop the uniform
    distribution, which leaves the argmax (the label) to tiny biases.

    Parameters
    ----------
    logits : Tensor, shape (B, k)
        Q's logits of B crops over the k categories.

    Returns
    -------
    Tensor, scalar
        ``mean_b H(softmax(logits_b))`` in nats: 0 when every crop gets one category with
        certainty, ``ln k`` when every crop gets the uniform distribution.

    Examples
    --------
    >>> round(mean_entropy(torch.zeros(4, 5)).item(), 4) == round(float(np.log(5)), 4)
    True
    """
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def cluster_occupancy(model: InfoWGAN, crops: np.ndarray, nucleus_px: float = 0.0,
                      size_channel: float = 0.0, batch_size: int = 512) -> list[int]:
    """How many of ``crops`` Q puts in each category (its argmax), the collapse watch.

    Parameters
    ----------
    model : InfoWGAN
    crops : ndarray, shape (N, 32, 32, 3), uint8
        A fixed sample of real crops.
    nucleus_px, size_channel : float
        The training's (see :func:`wsicell.learning.augment.to_unit_range`).

    Returns
    -------
    list of int, length k, summing to N.
    """
    device = next(model.parameters()).device
    counts = torch.zeros(model.categories, dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, len(crops), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size]))
            logits = model.q_logits(to_unit_range(batch.to(device), nucleus_px,
                                                   size_channel))
            counts += torch.bincount(logits.argmax(dim=1), minlength=model.categories)
    return counts.cpu().tolist()


def new_trainer(config: WsicellConfig, device: torch.device, world_size: int = 1, rank: int = 0,
                compile: bool = False) -> Trainer:
    """Freshly initialised networks (seeded by ``config.train.seed``) on ``device`` and their
    :class:`Trainer`."""
    cfg = config.train
    torch.manual_seed(cfg.seed)
    model = model_for(cfg).to(device)
    return Trainer(model, config, device, world_size, rank, compile)
