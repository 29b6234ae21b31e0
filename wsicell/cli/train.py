"""``wsicell train``: train the WGAN-GP + InfoGAN on the crops of a cell store."""

from __future__ import annotations

import sys

import click

from wsicell.cli.options import OUTPUT_DIR, count, field_type, positive
from wsicell.config import TrainConfig, load_config

EPILOG = """\b
Reading the curves (MODEL_DIR/losses.png, MODEL_DIR/log.jsonl, one line per iteration):
  V(D,G)  E[D(x)] - E[D(G(z,c))], the critic's Wasserstein estimate: rises early, then
          should level off (and slowly fall) as G improves. Steady growth or wild swings
          mean the critic wins (try more data, a lower lr).
  L_D     critic loss = -V + lambda1 * gradient penalty; negative and levelling off.
  L_G     -E[D(G(z,c))]; drifts with the critic's offset, only its trend matters.
  L_Q     cross-entropy of Q on G's categories; should fall towards 0 (the categories are
          distinguishable). Stuck near ln(k) means the categories carry no information
          (G ignores c): train longer, or raise --lr-info (1e-3 by default; the paper used 1e-4).
MODEL_DIR/samples.png shows G(z, c): rows = fixed noise, columns = categories; the columns
should look like different kinds of cells.

\b
Ctrl-C or SIGTERM: the current iteration is finished and a checkpoint written (exit 130 /
143); checkpoints are also written every --checkpoint-minutes. Interrupted runs continue
exactly with --resume (same options). The first line says where and what will run; the
time estimate follows after the first iterations (docs/training.md: choosing a width and
--max-minutes on a CPU).
Several GPUs: torchrun --nproc-per-node 4 -m wsicell.cli.main train --store ... --out ...
(each process streams its own share of the store; gradients are averaged across them).
"""


def _config_options(function):
    """One option per field of TrainConfig, defaulting to the paper's values."""
    for name, field in reversed(TrainConfig.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = f"{field.description} [default: {'auto' if default is None else default}]"
        if isinstance(default, bool) or field.annotation == bool | None:
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        elif isinstance(default, tuple):
            option = click.option(flag, name, type=field_type(name, field) or type(default[0]),
                                  nargs=len(default), default=None, help=help_text)
        else:
            kind = field.annotation if field.annotation in (int, float, str) else type(default)
            option = click.option(flag, name, type=field_type(name, field) or kind,
                                  default=None, help=help_text)
        function = option(function)
    return function


@click.command(epilog=EPILOG)
@click.option("--store", required=True, type=click.Path(),
              help="Zarr cell store of wsicell ingest (a path, or a URL such as "
              "s3://bucket/cells.zarr).")
@click.option("--slides", default=None,
              help="Comma-separated slide ids to train on [default: all complete slides].")
@click.option("--out", "out_dir", required=True, type=OUTPUT_DIR, help="Model directory.")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="JSON configuration file; the options below override its train section.")
@_config_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-iters", type=count(), default=None,
              help="Stop after this many iterations (short runs) [default: the epochs].")
@click.option("--max-minutes", type=positive(1e7, "minutes"), default=None,
              help="Time budget: stop (with a complete model directory) after the last "
              "iteration that fits in this many minutes.")
@click.option("--checkpoint-every", type=count(), default=1000, show_default=True,
              help="Iterations between checkpoints (one is also written at the end).")
@click.option("--checkpoint-minutes", type=positive(1e7, "minutes"), default=5.0,
              show_default=True, help="Also write a checkpoint when this many minutes have "
              "passed since the last one (Ctrl-C / SIGTERM write one too).")
@click.option("--sample-every", type=count(), default=1000, show_default=True,
              help="Iterations between loss / sample PNGs (also written at the end).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--workers", type=count(0, 256), default=2, show_default=True,
              help="Data-loading processes per GPU/process (0 = load in the training process).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the forward passes (GPU; the first iterations are slow).")
@click.option("--threads", type=count(1, 1024), default=None,
              help="CPU threads of torch [default: the free cores: the CPUs this process may "
              "use less the 1-minute load average, at least 1].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(store, slides, out_dir, config_file, device, max_iters, max_minutes, checkpoint_every,
          checkpoint_minutes, sample_every, resume, workers, compile_, threads, quiet, **hyper):
    """Train the GAN whose Q head sorts cells into k types (method section 2).

    One iteration = 5 critic steps on real crops, one generator step, one Q step. Writes
    MODEL_DIR/model.pt + config.json (read by wsicell predict), checkpoint.pt, log.jsonl,
    losses.png and samples.png.
    """
    import torch
    from tqdm.auto import tqdm

    from wsicell.learning.device import free_cpu_threads
    from wsicell.pipeline.training import TrainingInterrupted
    from wsicell.pipeline.training import train as run

    torch.set_num_threads(threads or free_cpu_threads())
    config = load_config(config_file, train=hyper)
    try:
        out = run(store, out_dir, config, slides=slides.split(",") if slides else None,
                  device=device, max_iters=max_iters, max_minutes=max_minutes,
                  checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
                  sample_every=sample_every, resume=resume, workers=workers, compile=compile_,
                  progress=not quiet, say=lambda line: tqdm.write(line, file=sys.stderr))
    except TrainingInterrupted as stopped:
        click.echo(f"wsicell: {stopped}", err=True)
        sys.exit(stopped.exit_code)
    click.echo(f"model: {out}")
