"""Process-group set-up under torchrun, the rank-0-first helper, and the all-ranks agreement the loop needs.

Outside torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op on one process.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

# Rank 0 does long work alone (demo data, hard-example generation, validation) while the others wait in
# a barrier; NCCL's default 10-minute timeout would abort the job (torch.distributed.init_process_group).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)
T = TypeVar("T")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun.

    The CUDA device is set before the group exists (NCCL binds each rank's communicator to the
    current device), and the timeout is long: see :data:`PROCESS_GROUP_TIMEOUT`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return dist.get_rank(), world


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for on one process)."""
    if world > 1:
        dist.barrier()


def main_first(fn: Callable[[], T], is_main: bool, world: int) -> T:
    """``fn()`` on rank 0 first (it may write a cache: demo data, a pruned ONNX), then on the others."""
    if is_main:
        out = fn()
    barrier(world)
    if not is_main:
        out = fn()
    return out


def all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank: one rank stopping alone would leave the others
    waiting in the gradient all-reduce forever, so they agree first (a one-element all-reduce)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
