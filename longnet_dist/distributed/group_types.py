"""`as_sequence_group`: what `sequence_group=` accepts, turned into the one type attention uses.

Accepted: None (one device), a `SequenceGroup` (from `build_mesh` / `init_sequence_parallel`), a
`torch.distributed.ProcessGroup`, or a 1-D `torch.distributed.device_mesh.DeviceMesh` (its group).
Objects with SequenceGroup's interface (test stand-ins) pass unchanged. A torch group becomes a
`SequenceGroup` that splits its segment subgroups off that group, among its own ranks, at first use
(sequence_group.py). Conversions are cached per ProcessGroup, for the life
of the process (like torch's own group registry), so each subgroup is created once.
"""

from __future__ import annotations

import torch.distributed as dist

from longnet_dist.distributed.sequence_group import SequenceGroup

ACCEPTED = "None, a longnet_dist SequenceGroup, a torch.distributed.ProcessGroup or a 1-D DeviceMesh"

_converted: dict = {}  # ProcessGroup -> SequenceGroup


def _device_mesh_type():
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # a torch built without distributed support
        return None
    return DeviceMesh


def can_split(group) -> bool:
    """Whether every backend of `group` (one per device type) can split it among its own ranks."""
    try:
        return all(group._get_backend(device).supports_splitting for device in group._device_types)
    except (AttributeError, RuntimeError):
        return False


def _group_of_mesh(mesh) -> dist.ProcessGroup:
    if mesh.ndim != 1:
        names = mesh.mesh_dim_names
        example = f"mesh[{names[-1]!r}]" if names else f"mesh.get_group(mesh_dim={mesh.ndim - 1})"
        raise ValueError(
            f"sequence_group is a {mesh.ndim}-D DeviceMesh (dims {names or tuple(range(mesh.ndim))}, shape "
            f"{tuple(mesh.shape)}); pass its 1-D sequence-parallel slice, e.g. {example}"
        )
    return mesh.get_group()


def _from_process_group(group: dist.ProcessGroup) -> SequenceGroup:
    if not dist.is_initialized():
        raise ValueError("sequence_group is a ProcessGroup but torch.distributed has no default process group; "
                         "call torch.distributed.init_process_group first (or init_sequence_parallel)")
    global_ranks = [dist.get_global_rank(group, rank) for rank in range(group.size())]
    rank = dist.get_rank()
    if rank not in global_ranks:
        raise ValueError(f"global rank {rank} is not a member of sequence_group (ranks {global_ranks}); "
                         f"pass the group this rank belongs to")
    return SequenceGroup(group, global_ranks, global_rank=rank, split_from_group=can_split(group))


def _has_sequence_group_interface(obj) -> bool:
    """Duck-typed stand-ins (tests): int `size` and `rank`, and `segment_subgroup`; not torch's groups,
    whose size and rank are methods."""
    size, rank = getattr(obj, "size", None), getattr(obj, "rank", None)
    int_fields = all(isinstance(value, int) and not isinstance(value, bool) for value in (size, rank))
    return int_fields and callable(getattr(obj, "segment_subgroup", None))


def as_sequence_group(obj) -> SequenceGroup | None:
    """`obj` as a SequenceGroup (None stays None); TypeError/ValueError naming what is accepted."""
    if obj is None or isinstance(obj, SequenceGroup) or _has_sequence_group_interface(obj):
        return obj
    device_mesh = _device_mesh_type()
    if device_mesh is not None and isinstance(obj, device_mesh):
        obj = _group_of_mesh(obj)
    process_group = getattr(dist, "ProcessGroup", None)
    if process_group is None or not isinstance(obj, process_group):
        hint = ""
        if type(obj) is int and obj == getattr(dist.GroupMember, "NON_GROUP_MEMBER", None):
            hint = " (torch returns GroupMember.NON_GROUP_MEMBER to ranks outside a new group: pass this rank's own)"
        raise TypeError(f"sequence_group must be {ACCEPTED}; got {type(obj).__name__} {obj!r}{hint}")
    if obj not in _converted:
        _converted[obj] = _from_process_group(obj)
    return _converted[obj]


__all__ = ["ACCEPTED", "as_sequence_group", "can_split"]
