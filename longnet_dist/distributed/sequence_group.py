"""A rank's sequence-parallel group and the segment subgroups that sharded attention branches use.

A segment subgroup is the sp ranks [first, first + count) of the group (a "span"). It is made in
one of two ways; either way every rank that takes part creates the same spans in one sorted order,
which is what keeps group creation from deadlocking:

- world: a group from `build_mesh` knows the sp ranks of every dp replica and makes each subgroup
  with `dist.new_group`, which is collective over the WHOLE world. So `prepare_segment_subgroups`
  runs at setup on every world rank, with the same spans (the trainer and `init_sequence_parallel`
  do this); a span missing later is an error (`segment_subgroup` names the call).
- split: a group made from a torch ProcessGroup (`as_sequence_group`) splits each subgroup off that
  group with `ProcessGroup.split_group`: every rank of the group (members of the span or not, as
  torch's split contract asks) enters each split; no rank outside the group takes part. So
  `dilated_attention` can create the spans at first use (`prepare_at_first_use`), where every rank
  of the group is anyway.
"""

from __future__ import annotations

import torch.distributed as dist

Span = tuple[int, int]  # (first sp rank, number of sp ranks)


def subgroup_rank_lists(replica_rank_lists: list[list[int]], spans: list[Span]) -> list[tuple[Span, list[int]]]:
    """Every process group that `spans` need, in the one order all world ranks create them.

    Spans are de-duplicated and sorted so the order does not depend on how the caller listed them;
    each span yields one group per dp replica (the same sp ranks of that replica's sp group).
    Spans of one rank need no process group; the full span reuses the sp group itself.
    """
    size = len(replica_rank_lists[0])
    to_create = []
    for first, count in sorted(set(spans)):
        if count == 1 or count == size:
            continue
        for replica_ranks in replica_rank_lists:
            to_create.append(((first, count), replica_ranks[first : first + count]))
    return to_create


def _one_device_per_backend(parent) -> list:
    """A device type for each distinct backend of `parent`, cpu first.

    A gloo group serves cpu and cuda with one backend; torch 2.13 would split it once per device
    type, and the two children would rendezvous on one store prefix and hang.
    """
    devices, backends = [], []
    for device in sorted(parent._device_types, key=lambda device: device.type != "cpu"):
        backend = parent._get_backend(device)
        if not any(backend is seen for seen in backends):
            devices.append(device)
            backends.append(backend)
    return devices


def split_segment_group(parent, first: int, count: int):
    """The ProcessGroup of ranks [first, first + count) of `parent`, or None on its other ranks.

    Collective over `parent`: all its ranks call it with the same span. (torch's `dist.split_group`
    refuses a CPU-only gloo world; the `ProcessGroup.split_group` method it wraps works on gloo.)
    The name, equal on every rank because the parent's is, keys the new group's store entries.
    """
    return parent.split_group(list(range(first, first + count)),
                              group_name=f"{parent.group_name}:longnet_segment:{first}+{count}",
                              device_types=_one_device_per_backend(parent))


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_ranks(global_ranks, global_rank) -> None:
    if not isinstance(global_ranks, (list, tuple)) or not global_ranks or not all(map(_is_rank, global_ranks)) \
            or len(set(global_ranks)) != len(global_ranks):
        raise ValueError(f"global_ranks={global_ranks!r} must be a non-empty list of distinct global ranks (integers "
                         f">= 0), in sequence-parallel rank order")
    if not _is_rank(global_rank) or global_rank not in global_ranks:
        raise ValueError(f"global rank {global_rank!r} is not a member of ranks {list(global_ranks)}")


def _check_process_group(group, global_ranks) -> None:
    """`group`: None for a group of one rank, else a torch ProcessGroup of len(global_ranks) ranks. Objects with
    ProcessGroup's `split_group` (test stand-ins) pass unchecked."""
    if group is None:
        if len(global_ranks) != 1:
            raise ValueError(f"a group of {len(global_ranks)} ranks {list(global_ranks)} needs a ProcessGroup")
        return
    process_group = getattr(dist, "ProcessGroup", None)
    if process_group is not None and isinstance(group, process_group):
        if group.size() != len(global_ranks):
            raise ValueError(f"group has {group.size()} ranks but global_ranks {list(global_ranks)} lists "
                             f"{len(global_ranks)}; pass the global ranks of that group, in its rank order")
        return
    if callable(getattr(group, "split_group", None)):
        return
    hint = ""
    if type(group) is int and group == getattr(dist.GroupMember, "NON_GROUP_MEMBER", None):
        hint = " (torch returns GroupMember.NON_GROUP_MEMBER to ranks outside a new group: pass this rank's own)"
    raise TypeError(f"group must be a torch.distributed.ProcessGroup (or None for a group of one rank), got "
                    f"{type(group).__name__} {group!r}{hint}")


class SequenceGroup:
    """The sequence-parallel group of this rank, or a segment subgroup of it.

    Attributes: `group` (ProcessGroup; None for a group of one rank, whose collectives are
    local copies), `rank` (this process's rank inside the group), `size`, `global_ranks`.
    Subgroups: with `replica_rank_lists` (the sp ranks of every dp replica) they are made over the
    world at setup; with `split_from_group` they are split off `group` (see the module doc); with
    neither this group cannot make any (a segment subgroup, or a backend that cannot split).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        global_ranks: list[int],
        *,
        global_rank: int,
        replica_rank_lists: list[list[int]] | None = None,
        split_from_group: bool = False,
    ) -> None:
        _check_ranks(global_ranks, global_rank)
        _check_process_group(group, global_ranks)
        self._setup(group, global_ranks, global_rank, replica_rank_lists, split_from_group)

    @classmethod
    def _of_segment(cls, group, global_ranks: list[int], global_rank: int) -> SequenceGroup:
        """A segment subgroup, whose process group torch made (new_group / split_group): not checked again."""
        subgroup = cls.__new__(cls)
        subgroup._setup(group, global_ranks, global_rank, None, False)
        return subgroup

    def _setup(self, group, global_ranks, global_rank, replica_rank_lists, split_from_group) -> None:
        self.group = group
        self.global_ranks = list(global_ranks)
        self.size = len(global_ranks)
        self.rank = self.global_ranks.index(global_rank)
        self._global_rank = global_rank
        self._replica_rank_lists = replica_rank_lists
        self._split_from_group = split_from_group
        self._prepared_spans: set[Span] = set()
        self._subgroups: dict[Span, SequenceGroup] = {}

    def __repr__(self) -> str:
        return f"SequenceGroup(rank={self.rank}, size={self.size}, global_ranks={self.global_ranks})"

    def _check_span(self, first: int, count: int) -> None:
        valid = isinstance(first, int) and isinstance(count, int) and first >= 0 and count >= 1
        if not valid or first + count > self.size:
            raise ValueError(
                f"segment span (first={first!r}, count={count!r}) is not inside this sequence group "
                f"of size {self.size}; need first >= 0, count >= 1, first + count <= {self.size}"
            )

    def prepare_segment_subgroups(self, spans: list[Span]) -> None:
        """Create the subgroups of all `spans` once; spans already prepared create nothing new.

        Collective, with the same spans on every rank: over the WHOLE world for a mesh group
        (torch's new_group needs every rank for every group, other dp replicas' ones included),
        over this group's ranks only for a group split from a torch ProcessGroup.
        """
        if self._replica_rank_lists is None and not self._split_from_group:
            raise ValueError(
                f"{self!r} cannot create segment subgroups: it is a segment subgroup itself (prepare spans "
                f"on the full sequence group), or its backend cannot split a group (at setup, on every "
                f"rank, use longnet_dist.distributed.init_sequence_parallel and pass the group it returns)"
            )
        for first, count in spans:
            self._check_span(first, count)
        new_spans = sorted({tuple(span) for span in spans} - self._prepared_spans)
        if self._replica_rank_lists is not None:
            for span, ranks in subgroup_rank_lists(self._replica_rank_lists, new_spans):
                self._add_subgroup(span, dist.new_group(ranks), ranks)
        else:
            for first, count in new_spans:
                if 1 < count < self.size:
                    ranks = self.global_ranks[first : first + count]
                    self._add_subgroup((first, count), split_segment_group(self.group, first, count), ranks)
        self._prepared_spans.update(new_spans)

    def prepare_at_first_use(self, spans: list[Span]) -> None:
        """What `dilated_attention` calls on every rank of this group before its collectives.

        A group split from a torch ProcessGroup creates the spans it lacks now (collective over
        this group, whose ranks are all in that call); a mesh group does nothing, since its
        subgroups need the whole world (`segment_subgroup` names the setup call if one is missing);
        a group that can make none raises ValueError if `spans` need any.
        """
        if self._split_from_group:
            self.prepare_segment_subgroups(spans)
        elif self._replica_rank_lists is None:
            missing = sorted({tuple(span) for span in spans if 1 < span[1] < self.size} - self._prepared_spans)
            if missing:
                raise ValueError(
                    f"sequence group {self!r} needs segment subgroups (first sp rank, count) {missing} but cannot "
                    f"create them among its own ranks (its ProcessGroup's backend cannot split, or it is a "
                    f"segment subgroup itself), and torch's new_group would need every rank of the world. At "
                    f"setup, on every rank, call longnet_dist.distributed.init_sequence_parallel("
                    f"sequence_parallel_size, seq_len, segment_lengths) and pass the group it returns"
                )

    def _add_subgroup(self, span: Span, process_group, ranks: list[int]) -> None:
        if self._global_rank in ranks:
            self._subgroups[span] = SequenceGroup._of_segment(process_group, ranks, self._global_rank)

    def segment_subgroup(self, first: int, count: int) -> SequenceGroup:
        """The subgroup of sp ranks [first, first + count), which must include this rank.

        Needs `prepare_segment_subgroups` for that span, except count == 1 (no process group)
        and count == size (the sequence group itself).
        """
        self._check_span(first, count)
        if not first <= self.rank < first + count:
            raise ValueError(
                f"sp rank {self.rank} is not in the segment span of sp ranks [{first}, {first + count}); "
                f"ask for the span that contains it"
            )
        if count == self.size:
            return self
        span = (first, count)
        if span not in self._subgroups:
            if count != 1:
                raise ValueError(
                    f"segment span {span} was not prepared (prepared: {sorted(self._prepared_spans)}); "
                    f"call prepare_segment_subgroups with it on every rank at setup"
                )
            self._subgroups[span] = SequenceGroup._of_segment(None, [self._global_rank], self._global_rank)
        return self._subgroups[span]
