"""Small collectives over the whole world on Python objects; plain no-ops in a single process."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order ([obj] without a process group). Collective."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank. Collective."""
    return all_gather_object(obj)[0]
