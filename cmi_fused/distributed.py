"""torch.distributed helpers of the regulariser, the trainers and the CLI: no-ops without a process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def process_group_initialized() -> bool:
    """Whether this process is in a default process group (under torchrun, once the Trainer has joined one)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(*tensors: torch.Tensor) -> tuple:
    """Each tensor summed over the ranks of the default process group, in one float32 all-reduce; the tensors
    themselves without a group or with one rank."""
    if not process_group_initialized() or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return tuple(part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True))


def is_main_process() -> bool:
    """False on every ``torchrun`` rank but rank 0, so that a command's summary line and a sweep's files come once,
    not once per process (read from ``RANK``, which torchrun sets: also right before the Trainer joins the group)."""
    return int(os.environ.get("RANK", "0")) == 0
