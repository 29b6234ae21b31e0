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


def any_rank(flags: list[bool], world_size: int, device: torch.device) -> list[bool]:
    """Each flag true when it is true on any rank of a multi-process run (one all-reduce),
    so that all ranks take the same decision (stop, checkpoint); the flags themselves for
    one process."""
    if world_size == 1:
        return list(flags)
    values = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX tiles), where
    bf16 autocast is about twice as fast as float32; elsewhere it is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def uses_bfloat16(amp: bool | None, device: torch.device) -> bool:
    """Whether training runs its forward passes under bf16 autocast.

    ``amp`` True / False forces it on / off; ``None`` (auto) means on for a CPU with
    native bfloat16 (:func:`cpu_supports_bfloat16`), off on a GPU (float32 / TF32 was
    faster there at batch 64) and on other CPUs (bfloat16 is emulated there).
    """
    if amp is None:
        return device.type == "cpu" and cpu_supports_bfloat16()
    return bool(amp)


def free_cpu_threads() -> int:
    """Intra-op threads for this process: the CPUs it may run on (its affinity) less the
    1-minute load average of the machine (other processes' running work), at least 1 and
    never more than the affinity.

    Examples
    --------
    >>> 1 <= free_cpu_threads() <= len(os.sched_getaffinity(0))
    True
    """
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(allowed, allowed - busy))
