"""Floor 1: the dp x sp process-group mesh and byte-counted collectives over sequence groups.

`init_sequence_parallel` sets it all up in one call; `as_sequence_group` turns a torch ProcessGroup or
1-D DeviceMesh into the `SequenceGroup` that attention uses.

`testing` (run_multiprocess) is imported explicitly by tests; it is not loaded here.
"""

from longnet_dist.distributed.collectives import (
    PendingCollective,
    all_gather_along,
    all_gather_tensor,
    all_gather_tensor_async,
    reduce_scatter_tensor,
    reduce_scatter_tensor_async,
)
from longnet_dist.distributed.group_types import as_sequence_group
from longnet_dist.distributed.mesh import (Mesh, build_mesh, init_distributed, leave_distributed, mesh_layout,
                                           valid_sequence_parallel_sizes)
from longnet_dist.distributed.sequence_group import SequenceGroup
from longnet_dist.distributed.setup import init_sequence_parallel
from longnet_dist.distributed.stats import CommStats, comm_stats

__all__ = [
    "CommStats",
    "Mesh",
    "PendingCollective",
    "SequenceGroup",
    "all_gather_along",
    "all_gather_tensor",
    "all_gather_tensor_async",
    "as_sequence_group",
    "build_mesh",
    "comm_stats",
    "init_distributed",
    "init_sequence_parallel",
    "leave_distributed",
    "mesh_layout",
    "reduce_scatter_tensor",
    "reduce_scatter_tensor_async",
    "valid_sequence_parallel_sizes",
]
