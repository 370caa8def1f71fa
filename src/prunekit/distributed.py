"""torchrun / DistributedDataParallel helpers that degrade to no-ops in a single process.

Launch: ``torchrun --nproc_per_node N script.py`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`init_from_env` turns that into a process group (NCCL on CUDA, gloo on CPU).
Every other helper works whether or not a group exists, so library code can call them unconditionally.
"""
from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = [
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "default_device",
    "init_from_env",
    "is_initialized",
    "is_main",
    "local_rank",
    "rank",
    "world_size",
]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's environment; returns whether one is active.

    Does nothing (and returns False) when WORLD_SIZE is unset or 1, or True when a group already exists.
    On CUDA, also selects ``cuda:LOCAL_RANK`` as the current device.

    Raises:
        ConfigError: WORLD_SIZE > 1 but RANK / MASTER_ADDR / MASTER_PORT are missing or malformed.
    """
    if is_initialized():
        return True
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={ws} but {', '.join(missing)} not set; launch with torchrun "
                          f"(e.g. torchrun --nproc_per_node {ws} ...)")
    r = int(os.environ["RANK"])
    if not 0 <= r < ws:
        raise ConfigError(f"RANK={r} is outside [0, WORLD_SIZE={ws})")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://", rank=r, world_size=ws,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Index of this process on its node (LOCAL_RANK, 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one rank that writes files and prints."""
    return rank() == 0


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (identity without a group); returns it."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup() -> None:
    """Destroy the process group if one exists.

    Collects garbage first so that DDP wrappers (reference cycles holding the group) die now, while
    the interpreter is whole: if the group outlives ``main``, a gloo worker thread may free a tensor
    during interpreter shutdown and abort the process ("terminate called without an active exception").
    """
    if is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
