"""Where the networks run: the torch device a user names, and the process group of a
multi-process run (``torchrun``)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from wsicell.errors import WsicellError


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


def join_process_group(device: torch.device) -> tuple[int, int, torch.device]:
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


def wait_for_all_ranks(world_size: int) -> None:
    """A barrier across the ranks of a multi-process run (nothing to do for one process)."""
    if world_size > 1:
        dist.barrier()
