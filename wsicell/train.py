"""Training the WGAN-GP + InfoGAN of method section 2 on the crops of a cell store.

One *iteration* is ``critic_steps`` (5) critic steps on real batches, then one generator step
and one Q step, each from freshly drawn noise z and categorical code c:

* critic: ``L_D = E[D(G(z,c))] - E[D(x)] + lambda1 * E[(||grad D(x_hat)||_2 - 1)^2]``, with
  ``x_hat`` uniformly on the lines between real and fake crops (gradient penalty, always in
  float32, differentiated with ``create_graph=True``);  ``V(D,G) = E[D(x)] - E[D(G(z,c))]``
  is the critic's estimate of the Wasserstein distance;
* generator: ``L_G = -E[D(G(z,c))]`` (steps G);
* Q: ``L_Q = lambda2 * cross_entropy(Q(G(z,c)), c)`` (steps G and Q = the shared trunk
  with the Q head, as the research code does).

Outputs in the model directory: ``checkpoint.pt`` (atomic; model, optimisers, RNG states,
iteration, config, store fingerprint), ``log.jsonl`` (one line per iteration),
``losses.png``, ``samples.png`` (rows = fixed z, columns = categories) and, at the end,
the final ``model.pt`` + ``config.json`` read by :func:`load_trained_model`.

Multi-GPU: run under ``torchrun --nproc-per-node N``; each rank streams its own share of the
store, gradients are averaged across ranks with ``all_reduce`` (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

import wsicell
from wsicell.config import WsicellConfig
from wsicell.data import CropStream, crop_loader, prepare_batch, random_dihedral
from wsicell.errors import WsicellError
from wsicell.files import write_atomically
from wsicell.model import (InfoWGAN, TrainedModel, build_model, generator_grid,
                           load_trained_model, save_trained_model)

__all__ = ["train", "load_trained_model", "TrainedModel", "gradient_penalty", "resolve_device"]

CHECKPOINT_FORMAT = "wsicell-train-checkpoint-v1"
CHECKPOINT, LOG, LOSSES_PNG, SAMPLES_PNG = "checkpoint.pt", "log.jsonl", "losses.png", "samples.png"
LOSS_NAMES = ("V", "L_D", "L_G", "L_Q")
CHECKPOINT_KEYS = {"iteration", "model", "optimizers", "rng", "config", "store_fingerprint",
                   "slides", "world_size"}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise WsicellError(f"--device {spec}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise WsicellError(f"--device {spec}: no CUDA GPU is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise WsicellError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise WsicellError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return device


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """WGAN-GP penalty ``E[(||grad_x D(x_hat)||_2 - 1)^2]``, in float32 (autocast off).

    Parameters
    ----------
    critic : callable
        (B, 3, 32, 32) -> (B,) critic values.
    real, fake : Tensor, shape (B, 3, 32, 32)
    generator : torch.Generator
        Draws the interpolation weights ``eps ~ U(0, 1)``, one per pair.

    Returns
    -------
    Tensor, scalar, differentiable with respect to the critic's parameters.
    """
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=real.device)
    x_hat = (eps * real.float() + (1 - eps) * fake.float()).requires_grad_(True)
    with torch.autocast(real.device.type, enabled=False):
        (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


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
    """The networks, their three Adam optimisers and the three update steps."""

    def __init__(self, model: InfoWGAN, config: WsicellConfig, device: torch.device,
                 world_size: int = 1, rank: int = 0, compile: bool = False):
        cfg = config.train
        self.model, self.cfg, self.device, self.world_size = model, cfg, device, world_size
        self.groups = model.parameter_groups()
        rates = {"critic": cfg.lr, "generator": cfg.lr, "info": cfg.lr_info}
        self.optimizers = {name: torch.optim.Adam(params, lr=rates[name], betas=tuple(cfg.betas))
                           for name, params in self.groups.items()}
        seed = int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0])
        self.generator = torch.Generator(device).manual_seed(seed)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=cfg.amp and device.type == "cuda")
        # torch.compile cannot differentiate twice, so the penalty always uses the eager critic.
        wrap = torch.compile if compile else (lambda f: f)
        self.fast_generator = wrap(model.generator)
        self.fast_critic = wrap(model.critic)
        self.fast_q = wrap(model.q_logits)

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

    def _fake(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, code, onehot = self.model.sample_inputs(batch, self.generator, self.device)
        with self.amp:
            return self.fast_generator(z, onehot), code

    def critic_step(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One critic step on a prepared real batch; returns (V(D,G), L_D), detached."""
        batch = real.shape[0]
        with torch.no_grad():
            fake, _ = self._fake(batch)
        with self.amp:
            scores = self.fast_critic(torch.cat([real, fake.to(real.dtype)])).float()
        value = scores[:batch].mean() - scores[batch:].mean()
        penalty = gradient_penalty(self.model.critic, real, fake, self.generator)
        loss = -value + self.cfg.lambda_gp * penalty
        self._step("critic", loss)
        return value.detach(), loss.detach()

    def generator_step(self) -> torch.Tensor:
        """One generator step, ``L_G = -E[D(G(z, c))]``; returns L_G, detached."""
        with frozen(self.groups["critic"]):
            fake, _ = self._fake(self.cfg.batch_size)
            with self.amp:
                loss = -self.fast_critic(fake).float().mean()
            self._step("generator", loss)
        return loss.detach()

    def info_step(self, real: torch.Tensor) -> torch.Tensor:
        """One Q step, ``L_Q = lambda2 * CE(Q(G(z, c)), c)`` on G, the trunk and the Q head,
        plus ``lambda3`` times the negative :func:`invariant_information` of Q on two random
        symmetries of the real batch when ``lambda_cluster > 0``; returns L_Q, detached."""
        with frozen(self.model.critic_head.parameters()):
            fake, code = self._fake(self.cfg.batch_size)
            with self.amp:
                logits = self.fast_q(fake).float()
            info = self.cfg.lambda_info * F.cross_entropy(logits, code)
            loss = info
            if self.cfg.lambda_cluster > 0:
                views = torch.cat([random_dihedral(real, self.generator) for _ in range(2)])
                with self.amp:
                    view_logits = self.fast_q(views).float()
                loss = loss - self.cfg.lambda_cluster * invariant_information(
                    *view_logits.chunk(2))
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
        return torch.cat([critic, torch.stack([self.generator_step(), self.info_step(real)])])


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


# --- checkpoints -------------------------------------------------------------------------

def _rng_state(trainer: Trainer) -> dict:
    states = [trainer.generator.get_state()]
    if trainer.world_size > 1:
        gathered = [None] * trainer.world_size
        dist.all_gather_object(gathered, states[0].cpu())
        states = gathered
    numpy_state = np.random.get_state()
    return {
        "generators": states,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(trainer: Trainer, state: dict, rank: int) -> None:
    trainer.generator.set_state(state["generators"][rank])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: Path, trainer: Trainer, iteration: int, config: WsicellConfig,
                    fingerprint: str, slides: list[str], rank: int) -> None:
    """Atomically write the full training state (collective under DDP: all ranks call it)."""
    rng = _rng_state(trainer)
    if rank != 0:
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "wsicell_version": wsicell.__version__,
        "iteration": iteration,
        "model": trainer.model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in trainer.optimizers.items()},
        "rng": rng,
        "config": json.dumps(config.to_json()),
        "store_fingerprint": fingerprint,
        "slides": slides,
        "world_size": trainer.world_size,
    }
    write_atomically(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    if not path.is_file():
        raise WsicellError(f"{path}: no checkpoint to resume from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise WsicellError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise WsicellError(f"{path}: not a wsicell training checkpoint")
    missing = CHECKPOINT_KEYS - checkpoint.keys()
    if missing:
        raise WsicellError(f"{path}: corrupt checkpoint (no {', '.join(sorted(missing))})")
    return checkpoint


def restore(trainer: Trainer, checkpoint: dict, path: Path, config: WsicellConfig,
            fingerprint: str, slides: list[str], rank: int) -> int:
    """Load a checkpoint's state into ``trainer`` after checking it belongs to this run;
    returns the iteration to continue from."""
    try:
        saved = WsicellConfig.model_validate(json.loads(checkpoint["config"]))
    except ValueError as err:
        raise WsicellError(f"{path}: corrupt checkpoint (config: {type(err).__name__})") from None
    if saved.train != config.train:
        changed = [k for k, v in config.train if getattr(saved.train, k) != v]
        raise WsicellError(f"{path}: checkpoint was trained with other settings "
                           f"({', '.join(changed)}); resume with the same options")
    if checkpoint["store_fingerprint"] != fingerprint or checkpoint["slides"] != slides:
        raise WsicellError(f"{path}: checkpoint was trained on other slides or another store")
    if checkpoint["world_size"] != trainer.world_size:
        raise WsicellError(f"{path}: checkpoint was trained with {checkpoint['world_size']} "
                           f"processes, resume with the same number")
    try:
        trainer.model.load_state_dict(checkpoint["model"])
        for name, optimizer in trainer.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        _set_rng_state(trainer, checkpoint["rng"], rank)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise WsicellError(f"{path}: corrupt checkpoint ({str(err).splitlines()[0]})") from None
    return int(checkpoint["iteration"])


# --- logging -----------------------------------------------------------------------------

class LossLog:
    """Per-iteration losses kept on the device and appended to ``log.jsonl`` in blocks
    (one host synchronisation per block, not per iteration)."""

    def __init__(self, path: Path, start: int, active: bool):
        self.path, self.active, self.pending, self.next = path, active, [], start + 1
        if active and path.exists():  # drop lines written after the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["iteration"] <= start]
            text = "".join(line + "\n" for line in kept)
            write_atomically(path, lambda f: f.write(text.encode()))

    def add(self, losses: torch.Tensor) -> None:
        self.pending.append(losses)

    def flush(self) -> dict | None:
        """Write pending iterations; returns the last one's losses (None when none pending)."""
        if not self.pending:
            return None
        rows = torch.stack(self.pending).cpu().tolist()
        self.pending = []
        now = time.time()
        lines = []
        for row in rows:
            lines.append(json.dumps({"iteration": self.next, **dict(zip(LOSS_NAMES, row)),
                                     "time": now}))
            self.next += 1
        if self.active:
            with self.path.open("a") as log:
                log.write("".join(line + "\n" for line in lines))
        return dict(zip(LOSS_NAMES, rows[-1]))


# --- pictures ----------------------------------------------------------------------------

def plot_losses(log_path: Path, png: Path) -> None:
    """Draw the curves of ``log.jsonl``: V(D,G), L_D, L_G, L_Q against the iteration
    (thin: per iteration; thick: moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    iterations = np.array([r["iteration"] for r in rows])
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    titles = {"V": "V(D,G) (Wasserstein estimate; should level off)", "L_D": "L_D (critic)",
              "L_G": "L_G (generator)", "L_Q": "L_Q (Q cross-entropy; should go to 0)"}
    for ax, name in zip(axes, LOSS_NAMES):
        values = np.array([r[name] for r in rows])
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(iterations, values, lw=0.5, alpha=0.4)
        ax.plot(iterations[window - 1:], smooth, lw=1.5)
        ax.set_title(titles[name], fontsize=9)
        ax.set_xlabel("iteration")
    fig.suptitle(f"wsicell {wsicell.__version__} training losses", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, png)


def plot_generator_grid(grid: np.ndarray, png: Path) -> None:
    """Draw G's samples, uint8 (rows, k, 32, 32, 3): rows = fixed z, columns = categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, k = grid.shape[:2]
    mosaic = grid.transpose(0, 2, 1, 3, 4).reshape(rows * grid.shape[2], k * grid.shape[3], 3)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * k, 0.5 + 0.8 * rows))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks((np.arange(k) + 0.5) * grid.shape[3], [f"c={c}" for c in range(k)])
    ax.set_yticks([])
    ax.set_ylabel("fixed noise z")
    ax.set_title("G(z, c): columns = categories", fontsize=9)
    _save_figure(fig, png)


def _save_figure(fig, png: Path) -> None:
    import matplotlib.pyplot as plt

    write_atomically(png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# --- the run -----------------------------------------------------------------------------

def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun; returns (rank, world size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), world_size, device


def select_slides(store, slides: list[str] | None) -> tuple[list[str], str]:
    """The complete slides to train on and the store fingerprint of that selection."""
    from wsicell.store import complete_slides, open_store, store_fingerprint

    root = open_store(store)
    complete = complete_slides(root)
    if not complete:
        raise WsicellError(f"{store}: the store holds no complete slide (run wsicell ingest)")
    if slides:
        missing = sorted(set(slides) - set(complete))
        if missing:
            raise WsicellError(f"{store}: no complete slide(s) {', '.join(missing)}")
        complete = sorted(set(slides))
    return complete, store_fingerprint(root, complete)


def total_iterations(config: WsicellConfig, n_crops: int, world_size: int) -> int:
    """Generator iterations of ``epochs`` passes over ``n_crops`` crops."""
    cfg = config.train
    crops_per_iteration = cfg.batch_size * cfg.critic_steps * world_size
    return max(1, math.ceil(cfg.epochs * n_crops / crops_per_iteration))


def train(store, out_dir, config: WsicellConfig, *, slides: list[str] | None = None,
          device: str = "auto", max_iters: int | None = None, checkpoint_every: int = 1000,
          sample_every: int = 1000, resume: bool = False, workers: int = 0,
          compile: bool = False, progress: bool = True) -> Path:
    """Train the networks on the crops of ``store`` and write the model directory.

    Parameters
    ----------
    store : path
        Zarr cell store written by ``wsicell ingest``.
    out_dir : path
        Model directory (created); holds checkpoints, the log, PNGs and the final model.
    config : WsicellConfig
        ``config.train`` holds the hyper-parameters.
    slides : list of str, optional
        Train on these complete slides only (default: all complete slides).
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    max_iters : int, optional
        Stop after this many iterations (default: ``epochs`` passes over the crops).
    checkpoint_every, sample_every : int
        Iterations between checkpoints / sample and loss PNGs (also written at the end).
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` exactly where it stopped.
    workers : int
        DataLoader worker processes per rank (0 = read in the training process).
    compile : bool
        ``torch.compile`` the generator and the critic/Q forward passes.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path of the model directory.
    """
    out = Path(out_dir)
    rank, world_size, torch_device = _distributed(resolve_device(device))
    slide_ids, fingerprint = select_slides(store, slides)
    checkpoint_path = out / CHECKPOINT
    if not resume and (checkpoint_path.exists() or (out / "model.pt").exists()):
        raise WsicellError(f"{out}: already holds a training run; use --resume or another --out")
    checkpoint = load_checkpoint(checkpoint_path) if resume else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    cfg = config.train
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.categories, cfg.noise_dim, cfg.width, cfg.seed).to(torch_device)
    trainer = Trainer(model, config, torch_device, world_size, rank, compile)
    start = 0
    if checkpoint is not None:
        start = restore(trainer, checkpoint, checkpoint_path, config, fingerprint, slide_ids, rank)

    stream = CropStream(store, slide_ids, cfg.batch_size, cfg.shuffle_buffer, cfg.seed,
                        rank, world_size, workers, start_batch=start * cfg.critic_steps)
    stop = total_iterations(config, stream.n_crops, world_size)
    stop = min(stop, max_iters) if max_iters is not None else stop
    pin = torch_device.type == "cuda"
    batches = (prepare_batch(b.to(torch_device, non_blocking=pin), trainer.generator,
                             cfg.rotate, cfg.stain_augment)
               for b in crop_loader(stream, workers, pin))

    log = LossLog(out / LOG, start, active=rank == 0)
    bar = tqdm(total=stop, initial=start, unit="it", desc="train",
               disable=not progress or rank != 0, dynamic_ncols=True)

    def save(iteration: int) -> None:
        log.flush()
        save_checkpoint(checkpoint_path, trainer, iteration, config, fingerprint, slide_ids, rank)

    def draw() -> None:
        if rank == 0:
            plot_losses(out / LOG, out / LOSSES_PNG)
            plot_generator_grid(generator_grid(model, 8, seed=0), out / SAMPLES_PNG)

    for iteration in range(start + 1, stop + 1):
        log.add(trainer.iteration(batches))
        bar.update(1)
        if iteration % 20 == 0 or iteration == stop:
            last = log.flush()
            if last:
                bar.set_postfix({k: f"{v:.3g}" for k, v in last.items()}, refresh=False)
        if iteration % checkpoint_every == 0 or iteration == stop:
            save(iteration)
        if iteration % sample_every == 0 or iteration == stop:
            draw()
    bar.close()
    if start >= stop:  # nothing left to run: still leave a complete model directory
        save(start)
        draw()
    if rank == 0:
        save_trained_model(out, model, config, {
            "store_fingerprint": fingerprint, "slides": slide_ids, "iterations": max(start, stop),
            "n_crops": stream.n_crops, "world_size": world_size})
    if world_size > 1:
        dist.barrier()
    return out
