"""The default process group and the data-parallel x sequence-parallel mesh on top of it.

Layout (world = dp x sp): sequence-parallel groups are blocks of consecutive global ranks,
data-parallel groups are strided. With world 8 and sp 4:
    sp groups: [0, 1, 2, 3], [4, 5, 6, 7]          (dp replica 0, dp replica 1)
    dp groups: [0, 4], [1, 5], [2, 6], [3, 7]      (one per sp rank)
global rank = dp_rank * sp_size + sp_rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longnet_dist.distributed.sequence_group import SequenceGroup

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(backend: str | None = None) -> None:
    """Initialise the default process group from torchrun's environment variables.

    Backend defaults to nccl when CUDA is available, else gloo. Does nothing when a group is already
    initialised, or when WORLD_SIZE is unset or 1 (single process, no group).
    """
    if dist.is_available() and dist.is_initialized():
        return
    world_size = world_size_from_env()
    if world_size == 1:
        return
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but the environment lacks {missing}; launch with torchrun "
            f"(or set all of {list(_TORCHRUN_VARIABLES)})"
        )
    rank = _env_int("RANK", 0, minimum=0, note="this process's global rank")
    if rank >= world_size:
        raise ValueError(f"environment variable RANK={rank} must be in 0..{world_size - 1} (this process's global "
                         f"rank; WORLD_SIZE={world_size}); torchrun sets it")
    local_rank = _env_int("LOCAL_RANK", 0, minimum=0, note="this process's rank on its node")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_own_gpu(local_rank))
    dist.init_process_group(backend=backend, init_method="env://")


def world_size_from_env() -> int:
    """torchrun's WORLD_SIZE (1 when unset); ValueError naming it when it is not a positive integer."""
    return _env_int("WORLD_SIZE", 1, minimum=1, note="the number of processes; unset or 1: one")


def _env_int(name: str, default: int, *, minimum: int, note: str) -> int:
    """The integer environment variable `name` (`default` when unset); ValueError naming it and its value."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer >= {minimum} ({note}); "
                         f"torchrun sets it")
    return value


def _own_gpu(local_rank: int) -> int:
    """This process's GPU under NCCL (`local_rank`), after checking that the node has one for each of its
    processes: NCCL refuses two ranks on one GPU, and CUDA's own error names neither the cause nor the fix."""
    processes = _env_int("LOCAL_WORLD_SIZE", local_rank + 1, minimum=1, note="the number of processes on this node")
    gpus = torch.cuda.device_count()
    if max(processes, local_rank + 1) > gpus:
        raise ValueError(
            f"{max(processes, local_rank + 1)} processes on this node (LOCAL_WORLD_SIZE={processes}, "
            f"LOCAL_RANK={local_rank}) but {gpus} visible GPU(s): NCCL needs a GPU for each; start at most "
            f"{gpus} per node (torchrun --nproc_per_node {gpus}), or set distributed.backend=gloo to run on the CPU")
    return local_rank


def leave_distributed() -> None:
    """End of a finished run: every rank meets at a barrier, then the default group is destroyed. A
    rank that exits while its gloo peers still hold their connections can abort at shutdown (SIGABRT
    after the run's last line), which fails the job under torchrun and SLURM. No group: nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _check_world_size(world_size) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer (the number of processes)")


def valid_sequence_parallel_sizes(world_size: int) -> list[int]:
    """Every sp size a world of `world_size` ranks can be split into (its divisors)."""
    _check_world_size(world_size)
    return [size for size in range(1, world_size + 1) if world_size % size == 0]


def mesh_layout(world_size: int, sequence_parallel_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(sequence-parallel groups, data-parallel groups) as lists of global ranks.

    sp group k = ranks [k*sp, (k+1)*sp); dp group j = ranks j, j+sp, j+2*sp, ...
    """
    _check_world_size(world_size)
    sp = sequence_parallel_size
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1 or world_size % sp != 0:
        raise ValueError(
            f"sequence_parallel_size={sp!r} must be a positive divisor of world_size={world_size}; "
            f"valid sizes: {valid_sequence_parallel_sizes(world_size)}"
        )
    dp = world_size // sp
    sequence_groups = [list(range(replica * sp, (replica + 1) * sp)) for replica in range(dp)]
    data_parallel_groups = [list(range(sp_rank, world_size, sp)) for sp_rank in range(sp)]
    return sequence_groups, data_parallel_groups


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the dp x sp mesh and the process groups it belongs to.

    `dp_group` is None only without torch.distributed (single process): never pass None to a
    torch collective meaning "my dp group", it would mean the whole world.
    `sequence_group` is None when sp_size == 1 (attention stays local).
    """

    world_size: int
    rank: int
    dp_size: int
    dp_rank: int
    sp_size: int
    sp_rank: int
    dp_global_ranks: list[int]
    dp_group: dist.ProcessGroup | None = field(repr=False)
    sequence_group: SequenceGroup | None = field(repr=False)


def build_mesh(sequence_parallel_size: int) -> Mesh:
    """Split the world into dp x sp; collective: every rank must call it, with the same size.

    Without an initialised process group this is the single-process mesh (world 1).
    """
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    sequence_groups, data_parallel_groups = mesh_layout(world_size, sequence_parallel_size)
    sp_size = sequence_parallel_size
    dp_rank, sp_rank = divmod(rank, sp_size)

    dp_group = None
    sequence_group = None
    if distributed:
        # torch rule: every rank creates every group, in the same order, members or not.
        sp_process_groups = [dist.new_group(ranks) for ranks in sequence_groups]
        dp_process_groups = [dist.new_group(ranks) for ranks in data_parallel_groups]
        dp_group = dp_process_groups[sp_rank]
        if sp_size > 1:
            sequence_group = SequenceGroup(
                sp_process_groups[dp_rank],
                sequence_groups[dp_rank],
                global_rank=rank,
                replica_rank_lists=sequence_groups,
            )
    return Mesh(
        world_size=world_size,
        rank=rank,
        dp_size=world_size // sp_size,
        dp_rank=dp_rank,
        sp_size=sp_size,
        sp_rank=sp_rank,
        dp_global_ranks=data_parallel_groups[sp_rank],
        dp_group=dp_group,
        sequence_group=sequence_group,
    )
