"""What every rank must decide alike, and which rank writes the shared files."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_rank0() -> bool:
    """Whether this process writes the dump folder's shared files (rank 0, or no process
    group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def agree_across_ranks(value: float, *, device: str = "cpu") -> float:
    """The lowest of every rank's ``value`` (the default process group; a fake one keeps it),
    where every rank must decide alike: whether the graph cache serves this start, and the
    memory bandwidth the overlap scheduler estimates from (torchtitan_ext.cpu). ``device``:
    one the default group's backend takes (an accelerator's under NCCL alone)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_backend() == "fake":
        return value
    agreed = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return agreed.item()
